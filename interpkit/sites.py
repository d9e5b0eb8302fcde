"""Uniform sites inside a trace: one function turns (site name, layer) into the live activation.

Runs inside nnsight traces (locally and on NDIF), so it imports nothing but torch. Layer outputs that
are tuples in some transformers versions are unwrapped here and nowhere else. The returned tensors are
the model's own: edit them in place (``x[:, pos] = v``) to patch.
"""
from __future__ import annotations

import torch

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")
"""resid_pre/resid_post: the residual stream entering/leaving a layer; attn_out/mlp_out: what the
attention/MLP sublayer writes; head_out: per-head attention outputs [batch, pos, head, d_head] (the
input of the output projection)."""


def first(x):
    """The hidden-state tensor of a module output that may be a tuple (older transformers)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def site(model, name: str, layer: int, n_heads: int = 0) -> torch.Tensor:
    """The activation ``name`` of ``layer`` in the current trace (access sites in forward order)."""
    block = model.layers[layer]
    if name == "resid_pre":
        return first(block.input)
    if name == "resid_post":
        return first(block.output)
    if name == "attn_out":
        return first(block.attn.output)
    if name == "mlp_out":
        return first(block.mlp.output)
    if name == "head_out":
        n_heads = n_heads or _config_heads(model)
        z = block.attn.o_proj.input
        return z.view(z.shape[0], z.shape[1], n_heads, z.shape[2] // n_heads)
    raise ValueError(f"unknown site {name!r}; use one of {SITES}")


def _config_heads(model) -> int:
    """The model's number of attention heads, from its config (``n_heads`` left out of ``site``)."""
    config = model.config
    for key in ("num_attention_heads", "n_head"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("head_out needs n_heads: pass site(model, 'head_out', layer, lm.arch.n_heads)")


def attention_pattern(model, layer: int) -> torch.Tensor:
    """Post-softmax attention [batch, head, dest, src] (models are loaded with eager attention)."""
    return model.layers[layer].attn.output[1]
