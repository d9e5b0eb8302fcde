"""Omega for models whose weights exist only on NDIF: the factored SVD runs in one remote session.

``server_factors`` runs inside ``model.session(remote=True)`` (torch only, so NDIF's import whitelist
accepts it): per layer it reads the attention norm and the Q/K projection from the server's modules,
folds the norm's gain (and LayerNorm bias) into W_Q, b_Q, W_K, b_K, centres W_Q/W_K over d_model when
asked (LayerNorm families), takes the QR factors and the SVD of the delta-0 cores of both sides, and
saves only those: per head Q factors [d, d_head] (per key head for K, float32 by default), R factors
[d_head, d_head], biases and the core's u, s, vh -- the d_head singular components Omega has, never a
d x d Omega or the unused weights (V, O, MLPs). ``omega_from_remote`` turns them into a regular ``Omega``; rotary cores for other distances are
computed locally from the small R factors (d_head x d_head), so no further request is needed.
"""
from __future__ import annotations

import torch

from interpkit.analyses.attention_tracing.linalg import augmented_r, center_rows, qr_pos
from interpkit.arch import raw_qk


def server_factors(model, layout: str, qkv: tuple, ln_bias: bool, layers: list, H: int, Hkv: int, dh: int,
                   d: int, offset: float, centred: bool, kv: torch.Tensor, frame_dtype: torch.dtype = torch.float32):
    """Inside a session (locally or on NDIF): per layer (QA, RA, QK, RK, b_Q, b_K, u_q, s_q, vh_q, u_k, s_k,
    vh_k). Computed in float64; the d x d_head frames QA [H] and QK [Hkv] (per key head, not expanded)
    travel as ``frame_dtype``, everything else is d_head-sized float64. Torch only. ``layout`` / ``qkv``:
    the family's Q/K layout and projection names (``raw_qk``); ``ln_bias``: the attention norm has a bias."""
    out = []
    for layer in layers:
        ln = model.layers[layer].ln_attn
        attn = model.layers[layer].attn
        gain = ln.weight.double() + offset
        shift = ln.bias if ln_bias else None
        shift = torch.zeros(d, dtype=torch.float64) if shift is None else shift.double()
        Wq, bq, Wk, bk = raw_qk(attn, layout, qkv, H, Hkv, dh, d, torch.float64)
        W_Q = (gain[:, None] * Wq).T.reshape(H, dh, d).transpose(1, 2)
        b_Q = (shift @ Wq + bq).reshape(H, dh)
        W_K = (gain[:, None] * Wk).T.reshape(Hkv, dh, d).transpose(1, 2)
        b_K = (shift @ Wk + bk).reshape(Hkv, dh)
        if centred:
            W_Q, W_K = center_rows(W_Q), center_rows(W_K)
        QA, RA = qr_pos(W_Q)
        QK, RK = qr_pos(W_K)
        u_q, s_q, vh_q = torch.linalg.svd(RA @ augmented_r(RK, b_K)[kv].transpose(-1, -2))
        u_k, s_k, vh_k = torch.linalg.svd(augmented_r(RA, b_Q) @ RK[kv].transpose(-1, -2))
        out.append([QA.to(frame_dtype).detach().cpu(), RA.detach().cpu(), QK.to(frame_dtype).detach().cpu()]
                   + [t.detach().cpu() for t in (RK, b_Q, b_K, u_q, s_q, vh_q, u_k, s_k, vh_k)])
    return out


def fetch_factors(lm, center: bool = True, layers: list[int] | None = None,
                  frame_dtype: torch.dtype = torch.float32) -> list:
    """``server_factors`` for every layer in ONE session (one NDIF request with ``lm.remote``)."""
    from interpkit.remote import ensure_shipped

    a = lm.arch
    layers = list(range(a.n_layers)) if layers is None else list(layers)
    kv = torch.tensor([a.kv_head(h) for h in range(a.n_heads)])
    centred = bool(center) and a.family.centred_norm
    ensure_shipped()
    model, remote = lm.model, lm.remote                       # never name ``lm`` inside the session
    layout, qkv, ln_bias = a.family.qk_layout, a.family.qkv, getattr(a.attn_norm(0), "bias", None) is not None
    H, Hkv, dh, d, offset = a.n_heads, a.n_kv_heads, a.d_head, a.d_model, float(a.family.norm_offset)
    with model.session(remote=remote):
        res = server_factors(model, layout, qkv, ln_bias, layers, H, Hkv, dh, d, offset, centred, kv,
                             frame_dtype).save()
    return list(res)


def _local_rotary(arch) -> None:
    """Give a weightless (meta) client model a real rotary embedding (computed from its config), so that
    the rotation matrices M(delta) can be built here without the server."""
    if not arch.rotary:
        return
    base = arch.decoder()
    rot = base.rotary_emb
    if any(b.is_meta for b in rot.buffers()):
        with torch.device("cpu"):
            base.rotary_emb = type(rot)(config=arch.hf.config)


def omega_from_remote(lm, center: bool = True, cache_dir=None, frame_dtype: torch.dtype = torch.float32):
    """An ``Omega`` whose factors and delta-0 cores were computed where the weights are (see module doc).
    ``frame_dtype``: precision of the d x d_head frames on the wire (float32 halves the transfer; the
    Q/K weights rebuilt here then agree with the server's to ~1e-7 relative)."""
    from interpkit.analyses.attention_tracing.omega import LayerFactors, Omega

    a = lm.arch
    kv = torch.tensor([a.kv_head(h) for h in range(a.n_heads)])
    parts = fetch_factors(lm, center, frame_dtype=frame_dtype)
    factors, cores = {}, {"q": [], "k": []}
    for layer, p in enumerate(parts):
        QA, RA, QK, RK, b_Q, b_K, u_q, s_q, vh_q, u_k, s_k, vh_k = (torch.as_tensor(t).double() for t in p)
        QK, RK, b_K = QK[kv], RK[kv], b_K[kv]                     # key factors of each query head's KV head
        scale = a.attn_scale(layer)
        softcap = a.softcap(layer)
        factors[layer] = LayerFactors(QA @ RA, b_Q, QK @ RK, b_K, QA, RA, augmented_r(RK, b_K), QK, RK,
                                      augmented_r(RA, b_Q), scale=float(scale), softcap=softcap)
        cores["q"].append((u_q, s_q, vh_q))
        cores["k"].append((u_k, s_k, vh_k))
    _local_rotary(a)
    delta0 = {(side, 0): tuple(torch.stack([c[i] for c in cores[side]]) for i in range(3)) for side in ("q", "k")}
    return Omega(a, lm.name, lm.revision, cache_dir=cache_dir, center=center, factors=factors, cores=delta0)
