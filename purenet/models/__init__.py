"""Models built from the layers, and sampling from them.

    pn.gpt(...), pn.GPT          gpt.py: a GPT-2 style decoder (tied embedding, pre-norm blocks)
    pn.llama(...), pn.LLaMA      llama.py: RMSNorm, RoPE, grouped-query attention, SwiGLU
    nanogpt.py                   nanoGPT's module layout, for pn.weights' nanoGPT checkpoints
    pn.generate(...)             sampling.py: autoregressive sampling with a key/value cache
"""
from purenet.models.gpt import GPT, gpt
from purenet.models.llama import LLaMA, llama
from purenet.models.sampling import generate

__all__ = ["GPT", "LLaMA", "generate", "gpt", "llama"]
