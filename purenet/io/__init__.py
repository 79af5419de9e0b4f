"""Weights and runs in and out of the process.

    pn.save / pn.load, pn.checkpoint     checkpoint.py: any pytree of arrays, atomically, checksummed
    pn.weights                           weights.py, the one surface of: safetensors.py (the format),
                                         state_dicts.py (any PyTorch module), nanogpt.py (nanoGPT's)
    pn.enable_compilation_cache          compile_cache.py: XLA's persistent compilation cache

Sharded checkpoints (one file per process) are `pn.distributed`'s.
"""
from purenet.io import checkpoint, compile_cache, weights

__all__ = ["checkpoint", "compile_cache", "weights"]
