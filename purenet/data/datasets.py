"""Real data sets that need no download.

- `digits()`: scikit-learn's embedded 8x8 handwritten digits (1,797 images).
- `mnist(path)`: a reader for MNIST's IDX files (gzip or raw), checked
  field by field; point it at a folder holding the files.
- `text(path)`: a character-level corpus (e.g. tiny Shakespeare) as ids,
  with its vocabulary and a 90/10 split; `windows` samples training batches.
"""
import gzip
import importlib.util
import math
import os
import struct
import zlib
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

if TYPE_CHECKING:  # jax is imported only where it is used (`windows`)
    import jax

__all__ = [
    "IDXError", "IMAGES_MAGIC", "LABELS_MAGIC", "MNIST_FILES", "Split", "Text", "digits", "mnist", "read_idx",
    "split", "standardize", "text", "windows",
]


class Split(NamedTuple):
    """A train/test split of a labelled data set (rows are examples).

    Attributes:
        x_train: training inputs, shape `(n_train, *features)`.
        y_train: training targets, shape (n_train, ...) (int32 labels for `digits`).
        x_test: test inputs, shape `(n_test, *features)`.
        y_test: test targets, shape (n_test, ...).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def standardize(x_train: np.ndarray, x_test: np.ndarray, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Scale features by the mean and std of the *training* part only.

    Each feature becomes (x - mean) / std with the training rows' mean and
    (population) std; a feature whose training std is below `eps` (constant,
    e.g. an always-blank pixel) is only centred.

    Args:
        x_train: training inputs, shape (n_train, features).
        x_test: test inputs, shape (n_test, features).
        eps: the std below which a feature is left unscaled.

    Returns:
        (x_train, x_test) standardised, the same shapes.
    """
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std < eps, 1.0, std)
    return (x_train - mean) / std, (x_test - mean) / std


def split(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """A fixed shuffled split: permutation of np.random.default_rng(seed).

    The first round(n * test_fraction) examples of the permutation are the
    test part, the rest the training part.

    Args:
        x: inputs, shape (n, ...).
        y: targets, shape (n, ...).
        test_fraction: the share of examples held out for testing.
        seed: the seed of the permutation.

    Returns:
        A `Split` (x_train, y_train, x_test, y_test).
    """
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def _load_digits():
    """(pixels float64 (1797, 64), labels int32): the CSV that scikit-learn ships,
    read without importing scikit-learn (a slow import: measured in
    benchmarks/README.md, "Measurements behind choices in the source"); its
    own `load_digits` is the fallback should that file ever move."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("digits() needs scikit-learn: pip install 'purenet[examples]'")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
        table = np.loadtxt(path, delimiter=",")
        if table.shape == (1797, 65):
            return table[:, :-1], table[:, -1].astype(np.int32)
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float64), data.target.astype(np.int32)


def digits(test_fraction: float = 0.2, seed: int = 0, standardized: bool = True,
           dtype: DTypeLike = np.float32) -> Split:
    """scikit-learn's 8x8 digits as float rows of 64 pixels and int32 labels 0..9.

    The split is fixed: a permutation from np.random.default_rng(seed), the
    first `test_fraction` of it for testing and the rest for training (by
    default 20%: 359 images for testing, 1,438 for training). With
    `standardized`, features are standardised with training statistics.

    Args:
        test_fraction: the share of the 1,797 images held out for testing.
        seed: the seed of the split's permutation.
        standardized: standardise each pixel with the training part's mean and
            std (`standardize`); False scales the pixels 0..16 to [0, 1].
        dtype: the dtype of the pixels.

    Returns:
        A `Split`: x_train (n_train, 64) and x_test (n_test, 64) in `dtype`,
            y_train (n_train,) and y_test (n_test,) int32 labels.

    Raises:
        ImportError: if scikit-learn is not installed.
    """
    pixels, labels = _load_digits()
    parts = split(pixels, labels, test_fraction, seed)
    x_train, x_test = parts.x_train, parts.x_test
    if standardized:
        x_train, x_test = standardize(x_train, x_test)
    else:
        x_train, x_test = x_train / 16.0, x_test / 16.0
    return Split(x_train.astype(dtype), parts.y_train, x_test.astype(dtype), parts.y_test)


# ---------------------------------------------------------------- MNIST IDX

IMAGES_MAGIC = 2051  # the first word of an IDX images file (unsigned bytes, three dimensions)
LABELS_MAGIC = 2049  # the first word of an IDX labels file (unsigned bytes, one dimension)
MNIST_FILES = {
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
}


class IDXError(ValueError):
    """A file that is not a valid MNIST IDX file, with the reason."""


# deflate expands at most 1032:1, so a gzip file of c bytes holds at most this many times c
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 20


def _read_at_most(f, n):
    """Up to n bytes from f, read in chunks (never an n-byte buffer up front)."""
    parts, left = [], n
    while left > 0:
        part = f.read(min(left, _CHUNK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _read_idx(path, f, limit, expected_magic):
    head = _read_at_most(f, 8)  # magic (its last byte: the number of dimensions) and the first dimension
    if len(head) < 8:
        raise IDXError(f"{path}: {len(head)} bytes is too short for an IDX header")
    magic = struct.unpack(">i", head[:4])[0]
    if magic != expected_magic:
        raise IDXError(f"{path}: magic number {magic}, expected {expected_magic}")
    ndim = head[3]
    if ndim == 0:
        raise IDXError(f"{path}: invalid dimensions () (an IDX file needs at least one)")
    raw_dims = head[4:] + _read_at_most(f, 4 * ndim - 4)
    if len(raw_dims) < 4 * ndim:
        raise IDXError(f"{path}: truncated header ({4 + len(raw_dims)} bytes, {4 + 4 * ndim} needed)")
    dims = struct.unpack(">" + "i" * ndim, raw_dims)
    if any(d <= 0 for d in dims):
        raise IDXError(f"{path}: invalid dimensions {dims}")
    size = math.prod(dims)  # a Python int: no overflow
    if size > limit:
        raise IDXError(f"{path}: dimensions {dims} need {size} data bytes, more than the file can hold")
    data = _read_at_most(f, size + 1)  # one more than declared: decompression stops there
    if len(data) != size:
        held = len(data) if len(data) < size else f"more than {size}"
        raise IDXError(f"{path}: holds {held} data bytes, dimensions {dims} need {size}")
    return np.frombuffer(data, np.uint8).reshape(dims)


def read_idx(path: str | os.PathLike[str], expected_magic: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes: images (magic 2051) or labels (2049).

    The header is read first; a gzip file is decompressed only up to the
    size its header declares (plus one byte, to detect extra data).

    Args:
        path: the file, gzip-compressed or raw.
        expected_magic: the magic number the file must start with
            (`IMAGES_MAGIC` or `LABELS_MAGIC`).

    Returns:
        The data, uint8 of the shape the header declares (e.g. (n, 28, 28)
            for images, (n,) for labels).

    Raises:
        IDXError: if the magic number, the header, the dimensions or the
            length are wrong, or the gzip data are corrupt or truncated.
        OSError: if the file cannot be opened (FileNotFoundError when missing).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(2) != b"\x1f\x8b":
            f.seek(0)
            return _read_idx(path, f, size, expected_magic)
        f.seek(0)
        try:
            with gzip.GzipFile(fileobj=f) as g:
                return _read_idx(path, g, size * _DEFLATE_MAX_RATIO, expected_magic)
        except (OSError, EOFError, zlib.error) as e:
            raise IDXError(f"{path}: corrupt or truncated gzip data ({e})") from e


def _find(folder, stem):
    for name in (stem + ".gz", stem):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"no {stem}(.gz) in {folder!r}: point mnist(path=...) at a folder with the MNIST IDX files"
    )


def mnist(path: str | os.PathLike[str], part: str = "test", dtype: DTypeLike = np.float32,
          shape: str = "rows") -> tuple[np.ndarray, np.ndarray]:
    """MNIST images as floats in [0, 1] and int32 labels.

    `path` is a folder with the IDX files (gzip or raw); part is "test"
    (t10k-*) or "train". shape="rows" gives rows of 784 pixels, "image"
    gives (n, 28, 28, 1) NHWC images for convolutions. Magic numbers,
    dimensions, lengths and label values are checked; a bad file raises
    IDXError naming the problem.

    Args:
        path: a folder holding the part's two IDX files (`MNIST_FILES`),
            each as `<name>.gz` or `<name>`.
        part: "test" (10,000 images) or "train" (60,000).
        dtype: the dtype of the pixels.
        shape: "rows" or "image".

    Returns:
        (x, y): x of shape (n, 784) ("rows") or (n, 28, 28, 1) ("image") in
            `dtype`, pixels / 255; y int32 labels (n,) in 0..9.

    Raises:
        ValueError: if `part` or `shape` is not one of the values above.
        FileNotFoundError: if the folder lacks a file.
        IDXError: if a file is not a valid IDX file, the images are not 3-D,
            the labels not 1-D, their counts differ or a label exceeds 9.
    """
    if part not in MNIST_FILES:
        raise ValueError(f"part must be one of {sorted(MNIST_FILES)}, got {part!r}")
    if shape not in ("rows", "image"):
        raise ValueError(f"shape must be 'rows' or 'image', got {shape!r}")
    images_stem, labels_stem = MNIST_FILES[part]
    images = read_idx(_find(path, images_stem), IMAGES_MAGIC)
    labels = read_idx(_find(path, labels_stem), LABELS_MAGIC)
    if images.ndim != 3:
        raise IDXError(f"images must be 3-D (count, rows, cols), got dimensions {images.shape}")
    if labels.ndim != 1:
        raise IDXError(f"labels must be 1-D, got dimensions {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(f"{len(images)} images but {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise IDXError(f"label {int(labels.max())} is not a digit 0-9")
    x = images.reshape(len(images), -1) if shape == "rows" else images[..., None]
    return x.astype(dtype) / 255.0, labels.astype(np.int32)


# ---------------------------------------------------------------- character-level text


class Text(NamedTuple):
    """A character-level corpus: int32 ids of the first 90% (train) and the last 10% (val).

    (The shares are `text`'s `val_fraction`, 0.1 by default.)

    Attributes:
        train: the training ids, int32 of shape (n_train,).
        val: the validation ids, int32 of shape (n_val,).
        vocab: the sorted distinct characters; id i is vocab[i].
    """

    train: np.ndarray
    val: np.ndarray
    vocab: str  # the sorted distinct characters; id i is vocab[i]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, s: str) -> np.ndarray:
        """A string -> int32 ids (every character must be in the vocabulary).

        Args:
            s: the text to encode.

        Returns:
            Its ids, int32 of shape (len(s),).

        Raises:
            ValueError: if `s` holds characters that are not in the vocabulary.
        """
        index = {c: i for i, c in enumerate(self.vocab)}
        missing = sorted(set(s) - set(index))
        if missing:
            raise ValueError(f"characters {missing!r} are not in the vocabulary of {len(self.vocab)}")
        return np.array([index[c] for c in s], np.int32)

    def decode(self, ids: ArrayLike) -> str:
        """Ids -> the string they spell.

        Args:
            ids: integer ids of any shape (read in C order), each in [0, vocab_size).

        Returns:
            The characters of the ids, joined.
        """
        return "".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))


def text(path: str | os.PathLike[str], val_fraction: float = 0.1) -> Text:
    """Read a UTF-8 text file as character ids and split it into training and validation.

    The vocabulary is the file's sorted distinct characters. The first
    1 - val_fraction of the characters (90% by default) are for training,
    the rest for validation (nanoGPT's shakespeare_char preparation).

        data = pn.datasets.text("input.txt")
        x, y = pn.datasets.windows(data.train, key, batch_size=12, context=64)

    Args:
        path: the text file, UTF-8.
        val_fraction: the share of the characters, at the end, kept for
            validation, in (0, 1).

    Returns:
        A `Text` (train ids, val ids, vocab).

    Raises:
        ValueError: if `val_fraction` is not in (0, 1) or the file holds fewer
            than 2 characters.
        OSError: if the file cannot be read.
        UnicodeDecodeError: if the file is not UTF-8.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    with open(path, encoding="utf-8") as f:
        corpus = f.read()
    if len(corpus) < 2:
        raise ValueError(f"{path!r} holds {len(corpus)} characters; a corpus needs at least 2")
    vocab = "".join(sorted(set(corpus)))
    lookup = np.zeros(max(map(ord, vocab)) + 1, np.int32)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.int32)
    ids = lookup[np.frombuffer(corpus.encode("utf-32-le"), np.uint32)]
    n = int(len(ids) * (1 - val_fraction))
    return Text(ids[:n], ids[n:], vocab)


def _positive_int(name: str, value) -> int:
    """value as an int, or a ValueError naming `name` (bools and floats are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"windows {name} must be a positive integer, got {value!r}")
    return int(value)


def windows(ids: Any, key: "jax.Array", batch_size: int, context: int) -> "tuple[jax.Array, jax.Array]":
    """`batch_size` random windows of a 1-D id array: `x = ids[s:s+context]`, `y = ids[s+1:s+context+1]`.

    Pure and jittable (`key` is a jax.random key; batch_size and context are
    static positive ints), so a training loop can draw its batches inside
    `lax.scan` from the whole array on the device. Starts are uniform over
    [0, len - context). Each argument is checked by name.

    Args:
        ids: the token ids, a 1-D integer array of length n > context.
        key: one jax.random key (typed, or a legacy uint32 key of shape (2,)).
        batch_size: how many windows, a positive int.
        context: the window length T, a positive int.

    Returns:
        (x, y): the inputs and the next-token targets, each of shape
            (batch_size, context) in ids' integer dtype; y is x shifted by one.

    Raises:
        ValueError: if batch_size or context is not a positive int, ids is not
            1-D, or ids holds no more than `context` ids.
        TypeError: if ids is not integer or key is not one PRNG key.
    """
    import jax
    import jax.numpy as jnp

    batch_size, context = _positive_int("batch_size", batch_size), _positive_int("context", context)
    if jnp.ndim(ids) != 1:
        raise ValueError(f"windows ids must be a 1-D array of token ids, got shape {jnp.shape(ids)}")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise TypeError(f"windows ids must be integer token ids, got dtype {jnp.result_type(ids)}")
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    if not (typed and jnp.ndim(key) == 0 or dtype == jnp.uint32 and jnp.shape(key) == (2,)):
        raise TypeError(f"windows key must be one jax.random key (jax.random.key(seed)), got {key!r}")
    n = jnp.shape(ids)[0]
    if n <= context:
        raise ValueError(f"windows of {context} ids (+1 for the targets) need more than {context} ids, got {n}")
    starts = jax.random.randint(key, (batch_size,), 0, n - context)
    idx = starts[:, None] + jnp.arange(context)[None, :]
    ids = jnp.asarray(ids)
    return ids[idx], ids[idx + 1]
