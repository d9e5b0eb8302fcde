"""Reads inside a trace that the uniform sites of ``interpkit.sites`` do not cover: q/k/v per head, the
attention pattern, and what each sublayer adds to the residual stream.

Runs inside nnsight traces (locally and on NDIF): torch only, and every argument is a plain value
(``Geometry`` is a ``repr=False`` dataclass of ints, floats and strings so it travels by value).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(repr=False)
class Geometry:
    """What trace code needs to know about a model, as plain values (see ``geometry(lm)``)."""

    family: str             # the family's name (for labels; trace code branches on the fields below)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    norm: str               # layernorm | rmsnorm (the final norm)
    norm_offset: float      # Gemma: the norm multiplies by (1 + weight)
    eps: float              # the final norm's epsilon
    softcap: float          # Gemma-2's final logit soft-cap (0: none)
    post_attn_norm: str | None   # Gemma-2: the block's norm on the attention output (``Family.post_attn_norm``)
    post_mlp_norm: str | None    # ... and on the MLP output; None: outputs go to the residual as they are
    post_eps: float         # epsilon of those post norms
    qk_layout: str          # fused_conv1d | neox_interleaved | separate (``Family.qk_layout``)
    qkv: tuple              # the attention's projection module name(s) of that layout
    conv1d: bool            # GPT-2: o_proj weight is [d_in, d_out]
    o_bias: bool            # the output projection has a bias
    unembed_bias: bool


def first(x):
    """The hidden-state tensor of a module output that may be a tuple (older transformers)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def read_qkv(model, g: Geometry, layer: int, which: str) -> torch.Tensor:
    """Query, key or value per head [B, T, heads, d_head]: the projections' outputs, before rotary."""
    attn = model.layers[layer].attn
    part = {"q": 0, "k": 1, "v": 2}[which]
    if g.qk_layout == "fused_conv1d":                 # [.., 3 * H * dh]: q | k | v blocks
        x = getattr(attn, g.qkv[0]).output
        d = g.n_heads * g.d_head
        x = x[..., part * d:(part + 1) * d]
        return x.reshape(x.shape[0], x.shape[1], g.n_heads, g.d_head)
    if g.qk_layout == "neox_interleaved":             # per head (q | k | v)
        x = getattr(attn, g.qkv[0]).output
        x = x.reshape(x.shape[0], x.shape[1], g.n_heads, 3 * g.d_head)
        return x[..., part * g.d_head:(part + 1) * g.d_head]
    x = getattr(attn, g.qkv[part]).output
    heads = g.n_heads if which == "q" else g.n_kv_heads
    return x.reshape(x.shape[0], x.shape[1], heads, g.d_head)


def read_pattern(model, layer: int) -> torch.Tensor:
    """Post-softmax attention [B, heads, dest, src] (eager attention returns it as output[1])."""
    return model.layers[layer].attn.output[1]


def o_proj_weight(model, g: Geometry, layer: int) -> torch.Tensor:
    """W_O as [heads, d_head, d_model], read from the live model (works on NDIF: no local weights)."""
    W = model.layers[layer].attn.o_proj.weight
    W = W if g.conv1d else W.t()
    return W.reshape(g.n_heads, g.d_head, g.d_model)


def frozen_scale(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The per-position divisor of a LayerNorm / RMSNorm applied to x [..., d] ([..., 1])."""
    x = x.float()
    if norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_gain(norm_module, offset: float) -> torch.Tensor:
    """The norm's elementwise gain (Gemma's (1 + weight) included)."""
    return norm_module.weight.float() + offset


def masked_mean_rows(W: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of W[ids[b, j]] over the j with ids >= 0: [B, d] (the logit-difference direction's halves)."""
    valid = (ids >= 0).float()
    rows = W[ids.clamp_min(0)].float()                            # [B, k, d]
    return (rows * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
