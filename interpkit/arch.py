"""The architecture adapter: a model's geometry and the weights analyses need, read once from the
HF module so analyses never branch on the family.

Q/K weights come with the attention norm's gain (and LayerNorm bias) folded in, so that for the
*normalised* layer input n(x) (``normalize``), ``q_h = n(x) @ W_Q[h] + b_Q[h]`` reproduces the model's
query before rotary; the same for keys. This is what Omega = W_Q W_K^T is built from.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from interpkit.families import Family


@dataclass
class QK:
    """Folded query/key weights of one layer (acting on the normalised input)."""

    W_Q: torch.Tensor            # [n_heads, d_model, d_head]
    b_Q: torch.Tensor            # [n_heads, d_head] (zeros when the model has no bias)
    W_K: torch.Tensor            # [n_kv_heads, d_model, d_head]
    b_K: torch.Tensor            # [n_kv_heads, d_head]
    scale: float                 # multiplies q.k before softmax
    softcap: float | None        # Gemma-2's tanh logit cap, applied after scaling


@dataclass
class Arch:
    """Geometry of one loaded model plus accessors to its raw HF modules (outside traces)."""

    family: Family
    hf: torch.nn.Module
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    rotary: bool
    rotary_dim: int

    @classmethod
    def from_hf(cls, hf: torch.nn.Module, family: Family) -> "Arch":
        c = hf.config
        n_heads = c.num_attention_heads
        d_model = c.hidden_size
        d_head = getattr(c, "head_dim", None) or d_model // n_heads
        rotary_dim = 0
        if family.rotary:
            factor = (getattr(c, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
            rotary_dim = int(d_head * factor)
        return cls(family=family, hf=hf, n_layers=c.num_hidden_layers, n_heads=n_heads,
                   n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads, d_model=d_model,
                   d_head=d_head, rotary=family.rotary, rotary_dim=rotary_dim)

    # -- raw modules (for weights; traces use the nnsight envoys); paths come from the Family record --
    def decoder(self) -> torch.nn.Module:
        """The base model under the LM head: embeddings, blocks, final norm, rotary embedding."""
        return functools.reduce(getattr, self.family.decoder.split("."), self.hf)

    def _blocks(self) -> torch.nn.ModuleList:
        return getattr(self.decoder(), self.family.blocks)

    def block(self, layer: int) -> torch.nn.Module:
        return self._blocks()[layer]

    def attn_module(self, layer: int) -> torch.nn.Module:
        return getattr(self.block(layer), self.family.attn)

    def attn_norm(self, layer: int) -> torch.nn.Module:
        return getattr(self.block(layer), self.family.attn_norm)

    def post_attn_norm(self, layer: int) -> torch.nn.Module | None:
        """The norm between the attention output and the residual add (Gemma-2), else None."""
        name = self.family.post_attn_norm
        return None if name is None else getattr(self.block(layer), name)

    def final_norm(self) -> torch.nn.Module:
        return getattr(self.decoder(), self.family.final_norm)

    def o_proj(self, layer: int) -> torch.nn.Module:
        return getattr(self.attn_module(layer), self.family.o_proj)

    def o_proj_weight(self, layer: int) -> torch.Tensor:
        """W_O as [n_heads, d_head, d_model]: head h writes z_h @ W_O[h] into the residual."""
        W = self.o_proj(layer).weight
        W = W if self.family.conv1d else W.T                # Conv1D stores [d_in, d_out]
        return W.reshape(self.n_heads, self.d_head, self.d_model)

    def o_proj_bias(self, layer: int) -> torch.Tensor:
        m = self.o_proj(layer)
        return m.bias if m.bias is not None else torch.zeros(self.d_model, dtype=m.weight.dtype)

    def softcap(self, layer: int) -> float | None:
        """The attention-logit soft-cap (Gemma-2), None for families without one."""
        name = self.family.softcap_attr
        return None if name is None else getattr(self.attn_module(layer), name, None)

    # -- attention geometry ------------------------------------------------------------------------
    def attn_eps(self, layer: int) -> float:
        return norm_eps(self.attn_norm(layer))

    def normalize(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """n(x): the attention norm of ``layer`` without its gain/bias (those live in ``qk``)."""
        xc, ms = norm_moments(x.float(), self.family.norm, self.attn_eps(layer))
        return (xc * torch.rsqrt(ms)).to(x.dtype)

    def qk(self, layer: int) -> QK:
        """Folded W_Q, b_Q, W_K, b_K of ``layer`` (see module docstring)."""
        ln, a = self.attn_norm(layer), self.attn_module(layer)
        H, Hkv, dh, d = self.n_heads, self.n_kv_heads, self.d_head, self.d_model
        gain = ln.weight.float() + self.family.norm_offset
        shift = getattr(ln, "bias", None)
        shift = torch.zeros(d) if shift is None else shift.float()
        Wq, bq, Wk, bk = raw_qk(a, self.family.qk_layout, self.family.qkv, H, Hkv, dh, d)   # [d, H*dh]
        fold = lambda W, b, n: ((gain[:, None] * W).T.reshape(n, dh, d).transpose(1, 2),  # noqa: E731
                                (shift @ W + b).reshape(n, dh))
        W_Q, b_Q = fold(Wq, bq, H)
        W_K, b_K = fold(Wk, bk, Hkv)
        return QK(W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, scale=self.attn_scale(layer), softcap=self.softcap(layer))

    def attn_scale(self, layer: int) -> float:
        """The factor on ``layer``'s attention scores (q.k times this before the softmax)."""
        attn = self.attn_module(layer)
        if hasattr(attn, "scaling"):
            return float(attn.scaling)
        c = self.hf.config
        scale = self.d_head ** -0.5 if getattr(c, "scale_attn_weights", True) else 1.0
        if getattr(c, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer + 1
        return scale

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the model's rotary embedding to per-head vectors x [..., T, d_head] at ``positions`` [T]."""
        if not self.rotary:
            return x
        cos, sin = self.decoder().rotary_emb(x.float(), positions[None].long())           # [1, T, rot]
        cos, sin = cos[0], sin[0]
        r = self.rotary_dim
        xr, xp = x[..., :r].float(), x[..., r:]
        half = r // 2
        rot = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
        return torch.cat([(xr * cos + rot * sin).to(x.dtype), xp], dim=-1)

    def kv_head(self, head: int) -> int:
        """The key/value head a query head reads (grouped-query attention)."""
        return head // (self.n_heads // self.n_kv_heads)

    def check_layer(self, layer: int) -> int:
        from interpkit.errors import UserError
        if not -self.n_layers <= layer < self.n_layers:
            raise UserError(f"layer {layer} is out of range; this model has layers 0..{self.n_layers - 1}")
        return layer % self.n_layers

    def check_head(self, head: int) -> int:
        from interpkit.errors import UserError
        if not 0 <= head < self.n_heads:
            raise UserError(f"head {head} is out of range; this model has heads 0..{self.n_heads - 1}")
        return head


def norm_eps(module: torch.nn.Module) -> float:
    """A LayerNorm's / RMSNorm's epsilon (HF spells it ``eps`` or ``variance_epsilon``)."""
    return float(getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-6)


def norm_moments(x: torch.Tensor, norm: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x centred for LayerNorm / as is for RMSNorm, mean square + eps [..., 1]): n(x) = x_c / sqrt(ms).

    The one place a norm kind changes the arithmetic; callers pick sqrt or rsqrt (and the dtype).
    """
    if norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x, x.pow(2).mean(-1, keepdim=True) + eps


def raw_qk(a, layout: str, names: tuple[str, ...], H: int, Hkv: int, dh: int, d: int,
           dtype: torch.dtype = torch.float32):
    """Unfolded (W_Q, b_Q, W_K, b_K) as [d, H*dh] / [H*dh] matrices acting as x @ W + b, in ``dtype``.

    ``a`` is an attention module, or its envoy inside an NDIF session (torch only); ``layout`` and
    ``names`` are the family's ``qk_layout`` and ``qkv``.
    """
    return QK_READERS[layout](a, names, H, Hkv, dh, d, dtype)


def _bias(m, n: int, dtype: torch.dtype) -> torch.Tensor:
    b = m.bias
    return torch.zeros(n, dtype=dtype) if b is None else b.to(dtype)


def _qk_fused_conv1d(a, names, H, Hkv, dh, d, dtype):
    """GPT-2: one Conv1D [d, 3d], output blocks q | k | v."""
    m = getattr(a, names[0])
    W, b = m.weight.to(dtype), m.bias.to(dtype)
    return W[:, :d], b[:d], W[:, d:2 * d], b[d:2 * d]


def _qk_neox_interleaved(a, names, H, Hkv, dh, d, dtype):
    """GPT-NeoX: one Linear [3d, d], per head (q | k | v) interleaved."""
    m = getattr(a, names[0])
    W = m.weight.to(dtype).reshape(H, 3, dh, d)
    b = _bias(m, 3 * H * dh, dtype).reshape(H, 3, dh)
    return (W[:, 0].reshape(H * dh, d).T, b[:, 0].reshape(-1),
            W[:, 1].reshape(H * dh, d).T, b[:, 1].reshape(-1))


def _qk_separate(a, names, H, Hkv, dh, d, dtype):
    """Llama / Gemma-2 / Mistral: separate q_proj [H*dh, d] and k_proj [Hkv*dh, d] Linears."""
    q, k = getattr(a, names[0]), getattr(a, names[1])
    return q.weight.to(dtype).T, _bias(q, H * dh, dtype), k.weight.to(dtype).T, _bias(k, Hkv * dh, dtype)


QK_READERS = {"fused_conv1d": _qk_fused_conv1d, "neox_interleaved": _qk_neox_interleaved,
              "separate": _qk_separate}


def attention_scores(arch: Arch, resid_pre: torch.Tensor, layer: int) -> torch.Tensor:
    """Pre-softmax attention scores [B, H, T, T] recomputed from folded Q/K (causal, unmasked values).

    An independent path to the model's own scores, used to check the folding (and by Omega tracing).
    """
    qk = arch.qk(layer)
    x = arch.normalize(resid_pre, layer).float()
    T = x.shape[1]
    q = torch.einsum("btd,hde->bhte", x, qk.W_Q) + qk.b_Q[None, :, None]
    k = torch.einsum("btd,hde->bhte", x, qk.W_K) + qk.b_K[None, :, None]
    pos = torch.arange(T)
    q, k = arch.rotate(q, pos), arch.rotate(k, pos)
    k = k[:, [arch.kv_head(h) for h in range(arch.n_heads)]]
    s = torch.einsum("bhqe,bhke->bhqk", q, k) * qk.scale
    if qk.softcap:
        s = torch.tanh(s / qk.softcap) * qk.softcap
    return s

