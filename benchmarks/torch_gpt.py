"""nanoGPT's model in PyTorch, the reference both GPT benchmarks train (imports no JAX).

Pre-LayerNorm blocks (causal F.scaled_dot_product_attention, a 4x exact-GELU
MLP, both residual), token and position embeddings, a final LayerNorm and
the output projection tied to the token embedding: `pn.gpt`'s architecture.
"""
import math


def gpt(vocab, context, layers, heads, features, gpt2_init=False):
    """The model: ids (batch, T) -> logits (batch, T, vocab). gpt2_init draws every matrix
    from N(0, 0.02^2), the residual projections from N(0, (0.02 / sqrt(2 layers))^2), and
    zeroes the biases, as GPT-2 and `pn.gpt` do (else PyTorch's default initialisation)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    d, h = features, heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(b, t, d)
            x = x + self.c_proj(o)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
            self.blocks = nn.ModuleList([Block() for _ in range(layers)])
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.wte.weight  # tied

        def forward(self, ids):
            x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            return self.lm_head(self.ln_f(x))

    model = GPT()
    if gpt2_init:
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
    return model
