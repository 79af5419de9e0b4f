"""Weights in and out, all under `pn.weights`: safetensors files, any PyTorch state_dict, nanoGPT checkpoints.

    pn.weights.save_safetensors(path, params, metadata=None)    # a file the `safetensors` library reads
    params = pn.weights.load_safetensors(path, like)            # and back, exactly (like=None: {name: array})
    net, params = pn.weights.from_nanogpt(state_dict_or_ckpt, heads=n_head)
    state = pn.weights.empty_state(net)                         # GPT keeps no state arrays
    state_dict = pn.weights.to_nanogpt(net, params)             # numpy arrays, nanoGPT's names and layouts
    params = pn.weights.from_state_dict(like, state_dict, names, transforms)   # any other module

The format, its name rule and what loading validates: `purenet.io.safetensors`.
State dicts and PyTorch's layouts (`LAYOUTS`): `purenet.io.state_dicts`.
nanoGPT's names and layouts: `purenet.io.nanogpt`. Every failure is a
`WeightsError`, a subclass of `pn.CheckpointError` (itself a ValueError).
"""
from purenet.io.nanogpt import empty_state, from_nanogpt, nanogpt, to_nanogpt
from purenet.io.safetensors import WeightsError, flatten, load_safetensors, safetensors_metadata, save_safetensors
from purenet.io.state_dicts import LAYOUTS, from_state_dict

__all__ = ["LAYOUTS", "WeightsError", "empty_state", "flatten", "from_nanogpt", "from_state_dict", "load_safetensors",
           "nanogpt", "safetensors_metadata", "save_safetensors", "to_nanogpt"]
