"""Data sets: the digits split and the MNIST IDX reader (real files and broken ones)."""
import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import purenet as pn
from purenet.data.datasets import IDXError

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def write_idx(path, array, magic=None, compress=False):
    array = np.asarray(array, np.uint8)
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    raw = struct.pack(">i", magic) + struct.pack(">" + "i" * array.ndim, *array.shape) + array.tobytes()
    if compress:
        raw = gzip.compress(raw)
    Path(path).write_bytes(raw)
    return raw


def make_mnist(folder, n=5, compress=True):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return images, labels


def test_digits_split_is_fixed_and_standardised_with_training_statistics():
    a, b = pn.datasets.digits(), pn.datasets.digits()
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (1438, 64) and a.x_test.shape == (359, 64)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0.0, atol=1e-5)
    assert abs(float(a.x_test.mean())) > 1e-4  # test statistics were not used
    assert set(np.unique(a.y_test)) == set(range(10))


def test_digits_are_exactly_scikit_learns_without_importing_it():
    """digits() reads the CSV scikit-learn ships (no ~1.5 s import); it must be load_digits, pixel for pixel."""
    code = "import sys, purenet; purenet.data.datasets.digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from sklearn.datasets import load_digits

    reference = load_digits()
    pixels, labels = pn.datasets._load_digits()
    np.testing.assert_array_equal(pixels, reference.data)
    np.testing.assert_array_equal(labels, reference.target)
    assert labels.dtype == np.int32


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_reader_round_trip(tmp_path, compress):
    images, labels = make_mnist(tmp_path, compress=compress)
    x, y = pn.datasets.mnist(tmp_path)
    assert x.shape == (5, 784) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, images.reshape(5, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)


def test_mnist_reader_on_the_real_test_set():
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the shared MNIST files are not at {SHARED_MNIST}")
    x, y = pn.datasets.mnist(SHARED_MNIST)
    assert x.shape == (10000, 784) and y.shape == (10000,)
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(y[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    np.testing.assert_array_equal(np.bincount(y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


@pytest.mark.parametrize("damage,message", [
    ("magic", "magic number 2049, expected 2051"),
    ("truncated", "holds 3919 data bytes, dimensions .* need 3920"),
    ("header", "too short for an IDX header"),
    ("gzip", "corrupt or truncated gzip"),
    ("dims", "invalid dimensions"),
])
def test_mnist_reader_rejects_broken_files(tmp_path, damage, message):
    make_mnist(tmp_path, compress=False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    raw = images.read_bytes()
    if damage == "magic":
        images.write_bytes(struct.pack(">i", 2049) + raw[4:])
    elif damage == "truncated":
        images.write_bytes(raw[:-1])
    elif damage == "header":
        images.write_bytes(raw[:6])
    elif damage == "gzip":
        images.unlink()
        (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-20])
    elif damage == "dims":
        images.write_bytes(raw[:4] + struct.pack(">i", 0) + raw[8:])
    with pytest.raises(IDXError, match=message):
        pn.datasets.mnist(tmp_path)


def test_mnist_reader_rejects_mismatched_counts_and_bad_labels(tmp_path):
    make_mnist(tmp_path, n=5, compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4))
    with pytest.raises(IDXError, match="5 images but 4 labels"):
        pn.datasets.mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", [1, 2, 3, 12, 0])
    with pytest.raises(IDXError, match="label 12 is not a digit"):
        pn.datasets.mnist(tmp_path)


def test_mnist_reader_says_where_to_point_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="point mnist"):
        pn.datasets.mnist(tmp_path)


def test_a_gzip_bomb_is_cut_at_the_size_its_header_declares(tmp_path, monkeypatch):
    header = struct.pack(">iiii", 2051, 10, 28, 28)  # declares 7,840 bytes
    bomb = gzip.compress(header + bytes(64 << 20), compresslevel=1)  # holds 64 MiB of zeros
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bomb)
    read = []
    real = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, n=-1: read.append(n) or real(self, n))
    with pytest.raises(IDXError, match="holds more than 7840 data bytes, dimensions .* need 7840"):
        pn.datasets.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051)
    assert 0 < sum(read) <= 8 + 8 + 7841  # header, dims, data + 1: never the whole stream


def test_dimension_products_do_not_overflow(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(struct.pack(">iiiii", 2051 + 1, 2**31 - 1, 2**31 - 1, 2**31 - 1, 8) + bytes(16))
    with pytest.raises(IDXError, match=f"need {(2**31 - 1) ** 3 * 8} data bytes, more than the file"):
        pn.datasets.read_idx(path, 2052)
