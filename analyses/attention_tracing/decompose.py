"""Upstream components of the residual stream, from ONE nnsight trace per prompt batch.

The trace (``trace_activations``; torch only, so it runs unchanged on NDIF) saves per layer the
residual stream entering the layer, the value vectors the attention uses (the inputs of the attention
function, uniform across families), the attention pattern and the attention output; then the input of
the final norm and the last-position logits. Everything else is torch math outside the trace:

    resid_pre[l] = embed + sum_{l' < l} ( sum_{h,t} A[l',h,p,t] v_t W_O[h]  +  b_O[l']  +  mlp[l'] )

- per head per source token: A[d, t] * (v_t W_O[h]) (``vW[l, h, t]``), times the frozen post-attention
  norm factor for Gemma-2 (its post-attention RMSNorm is linear once its scale is fixed);
- attention output bias per layer; MLP = the rest of the layer's residual update (exact for sequential
  and parallel (NeoX) blocks); embedding = the residual entering layer 0.

Normalisation: Omega acts on the *normalised* input x^ = n(x) of a layer (LayerNorm: centred and divided
by the scale sigma; RMSNorm: divided by sigma), with the gains folded into W_Q/W_K. With sigma frozen
(it is a property of the whole residual at that position), n is linear: n(x) = sum_c centre(c) / sigma,
so each upstream component c enters the layer's input as centre(c) / sigma(p). Instead of normalising
every component, ``contributions`` turns the direction it is projected on into residual space once:
centre(c) . g / sigma = c . (g - mean(g)) / sigma.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.arch import norm_eps, norm_moments
from interpkit.sites import first


def trace_activations(model, inputs: dict, n_layers: int, remote=False) -> dict:
    """One forward saving what the decomposition needs; runs unchanged locally and remotely."""
    with model.trace(inputs, remote=remote):
        resid = list().save()
        values = list().save()
        patterns = list().save()
        attn_out = list().save()
        for layer in range(n_layers):
            block = model.layers[layer]
            resid.append(first(block.input).detach().cpu())
            args = block.attn.source.attention_interface_1.inputs[0]
            values.append(args[3].detach().cpu())
            out = block.attn.output
            attn_out.append(out[0].detach().cpu())
            patterns.append(out[1].detach().cpu())
        resid.append(model.final_norm.input.detach().cpu())
        logits = model.output.logits[:, -1].detach().cpu().save()
    return {"resid": resid, "values": values, "patterns": patterns, "attn_out": attn_out, "logits": logits}


def collect(lm, inputs: dict) -> dict:
    """``trace_activations`` for a LoadedModel, stacked: resid [L+1,B,T,d], values [L,B,Hkv,T,dh], ..."""
    with torch.no_grad():
        raw = trace_activations(lm.model, inputs, lm.arch.n_layers, remote=lm.remote)
    out = {k: torch.stack(list(raw[k])) for k in ("resid", "values", "patterns", "attn_out")}
    out["logits"] = raw["logits"]
    out["attention_mask"] = inputs["attention_mask"].cpu()
    return out


# -- weights --------------------------------------------------------------------------------------
@dataclass
class Weights:
    """Weights the decomposition needs, read once (float64)."""

    norm: str                          # "layernorm" | "rmsnorm"
    attn_eps: list[float]
    W_O: torch.Tensor                  # [L, H, dh, d]
    b_O: torch.Tensor | None           # [L, d] (None when the model has no output bias)
    post_gain: torch.Tensor | None     # [L, d] Gemma-2 post-attention norm gain (1 + w), else None
    post_eps: float
    final_gain: torch.Tensor           # [d]
    final_bias: torch.Tensor           # [d]
    final_eps: float
    W_U: torch.Tensor                  # [V, d] (a view of the model's unembedding)
    kv: torch.Tensor                   # [H] key/value head of each query head


def load_weights(arch) -> Weights:
    L, off = arch.n_layers, arch.family.norm_offset
    with torch.no_grad():
        W_O = torch.stack([arch.o_proj_weight(l).detach().double() for l in range(L)])
        b_O = torch.stack([arch.o_proj_bias(l).detach().double() for l in range(L)])
        posts = [arch.post_attn_norm(l) for l in range(L)]
        post_gain = None if posts[0] is None else torch.stack([p.weight.detach().double() + off for p in posts])
        fn = arch.final_norm()
        fb = getattr(fn, "bias", None)
        return Weights(
            norm=arch.family.norm, attn_eps=[arch.attn_eps(l) for l in range(L)], W_O=W_O,
            b_O=None if not b_O.abs().sum() else b_O, post_gain=post_gain,
            post_eps=norm_eps(posts[0]) if posts[0] is not None else 0.0,
            final_gain=fn.weight.detach().double() + off,
            final_bias=torch.zeros(arch.d_model, dtype=torch.float64) if fb is None else fb.detach().double(),
            final_eps=norm_eps(fn), W_U=arch.hf.get_output_embeddings().weight.detach(),
            kv=torch.tensor([arch.kv_head(h) for h in range(arch.n_heads)]))


def logit_direction(w: Weights, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(direction in the final norm's normalised space, constant from the final norm's bias).

    logit_diff = x^_final . direction + constant, with the mean unembedding of the answers minus that of
    the wrong tokens (-1 pads ignored), as in ``interpkit.metrics.logit_diff``.
    """
    mean = lambda ids: w.W_U[ids[ids >= 0]].double().mean(0)  # noqa: E731
    du = mean(answer_ids) - mean(wrong_ids)
    return w.final_gain * du, float(w.final_bias @ du)


def normalise(x: torch.Tensor, norm: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n(x), sigma [...]) in x's dtype: ``Arch.normalize``'s arithmetic (``norm_moments``), kept in float64
    and with the scale sigma, which the decomposition freezes; also serves the final norm."""
    xc, ms = norm_moments(x, norm, eps)
    sigma = torch.sqrt(ms)
    return xc / sigma, sigma[..., 0]


# -- one prompt -----------------------------------------------------------------------------------
@dataclass
class PromptDecomposition:
    """One prompt's components, with left padding removed (positions 0..n-1 = padded offset..T-1)."""

    n: int
    offset: int
    centred: bool                      # LayerNorm: directions are centred before projecting
    resid: torch.Tensor                # [L+1, n, d]  (last = final norm input)
    xhat: torch.Tensor                 # [L, n, d]    normalised attention input of each layer
    sigma: torch.Tensor                # [L, n]
    xhat_final: torch.Tensor           # [n, d]
    sigma_final: torch.Tensor          # [n]
    q: torch.Tensor                    # [L, H, n, dh] queries before rotary (with bias)
    k: torch.Tensor                    # [L, H, n, dh] keys of each query head's KV head, before rotary
    A: torch.Tensor                    # [L, H, n, n]
    vW: torch.Tensor                   # [L, H, n, d]  v_t W_O[h]
    post: torch.Tensor | None          # [L, n, d] frozen post-attention norm factor (Gemma-2)
    bias: torch.Tensor | None          # [L, d] attention output bias
    mlp: torch.Tensor                  # [L, n, d]
    embed: torch.Tensor                # [n, d]
    attn_resid: torch.Tensor           # [L, n, d] what attention adds to the residual


def decompose(omega, w: Weights, acts: dict, row: int) -> PromptDecomposition:
    """Decomposition of prompt ``row`` of a ``collect`` result."""
    L = omega.arch.n_layers
    mask = acts["attention_mask"][row]
    off = int((mask == 0).sum())
    pos = slice(off, None)
    resid = acts["resid"][:, row, pos].double()
    n = resid.shape[1]
    xs, sig = zip(*(normalise(resid[l], w.norm, w.attn_eps[l]) for l in range(L)))
    xhat, sigma = torch.stack(xs), torch.stack(sig)
    fnorm = normalise(resid[L], w.norm, w.final_eps)
    fs = [omega.factors(l) for l in range(L)]
    q = torch.stack([torch.einsum("nd,hde->hne", xhat[l], f.W_Q) + f.b_Q[:, None] for l, f in enumerate(fs)])
    k = torch.stack([torch.einsum("nd,hde->hne", xhat[l], f.W_K) + f.b_K[:, None] for l, f in enumerate(fs)])
    A = acts["patterns"][:, row][:, :, pos, pos].double()
    v = acts["values"][:, row][:, w.kv][:, :, pos].double()                       # [L, H, n, dh]
    vW = torch.einsum("lhte,lhed->lhtd", v, w.W_O)
    raw = acts["attn_out"][:, row, pos].double()                                   # [L, n, d]
    post = None
    if w.post_gain is not None:
        r = torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + w.post_eps)
        post = r * w.post_gain[:, None, :]
    attn_resid = raw if post is None else raw * post
    mlp = resid[1:] - resid[:-1] - attn_resid
    return PromptDecomposition(n=n, offset=off, centred=w.norm == "layernorm", resid=resid, xhat=xhat, sigma=sigma,
                               xhat_final=fnorm[0], sigma_final=fnorm[1], q=q, k=k, A=A, vW=vW, post=post,
                               bias=w.b_O, mlp=mlp, embed=resid[0], attn_resid=attn_resid)


# -- projecting components ------------------------------------------------------------------------
@dataclass
class Contributions:
    """Each upstream component's contribution to a signal (sums exactly to the signal's total)."""

    head: torch.Tensor                 # [layers, H, n] per head per source token
    mlp: torch.Tensor                  # [layers]
    bias: torch.Tensor | None          # [layers]
    embed: torch.Tensor                # scalar

    def total(self) -> float:
        t = self.head.sum() + self.mlp.sum() + self.embed
        return float(t + (0 if self.bias is None else self.bias.sum()))


def contributions(dec: PromptDecomposition, layer: int, positions: torch.Tensor, B: torch.Tensor,
                  C: torch.Tensor, sigma: torch.Tensor) -> Contributions:
    """Contributions of every component below ``layer`` to sum_p x^_p . (B @ C[p]).

    B [d, r] and C [P, r] describe one direction per position in ``positions`` (normalised space of the
    reading norm, whose scales are ``sigma`` [P]). Heads: per source token t (summed over positions).
    """
    Bc = B - B.mean(0, keepdim=True) if dec.centred else B
    Cs = C / sigma[:, None]
    Bc, Cs = _compress(Bc, Cs)
    A = dec.A[:layer][:, :, positions, :]                                          # [l, H, P, n]
    if dec.post is None:
        proj = torch.einsum("lhtd,dr->lhtr", dec.vW[:layer], Bc)
        head = torch.einsum("lhpt,lhtr,pr->lht", A, proj, Cs)
    else:
        G = torch.einsum("dr,pr->pd", Bc, Cs)
        proj = torch.einsum("lhtd,lpd->lhpt", dec.vW[:layer], dec.post[:layer][:, positions] * G)
        head = (A * proj).sum(2)
    mlp = torch.einsum("lpd,dr,pr->l", dec.mlp[:layer][:, positions], Bc, Cs)
    bias = None
    if dec.bias is not None:
        b = dec.bias[:layer, None, :].expand(-1, len(positions), -1)
        if dec.post is not None:
            b = b * dec.post[:layer][:, positions]
        bias = torch.einsum("lpd,dr,pr->l", b, Bc, Cs)
    embed = torch.einsum("pd,dr,pr->", dec.embed[positions], Bc, Cs)
    return Contributions(head=head, mlp=mlp, bias=bias, embed=embed)


def _compress(B: torch.Tensor, C: torch.Tensor, tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """B @ C^T with the fewest columns: rank-1 for non-rotary key-side signals (same direction everywhere)."""
    if C.shape[1] <= 1 or C.shape[0] <= 1:
        return B, C
    Uc, Sc, Vh = torch.linalg.svd(C, full_matrices=False)
    r = max(1, int((Sc > tol * Sc[0]).sum())) if Sc[0] > 0 else 1
    if r >= C.shape[1]:
        return B, C
    return B @ (Vh[:r].T * Sc[:r]), Uc[:, :r]
