"""From-scratch reference of Franco & Crovella's (2025) signal selection on GPT-2, for the tests.

Written from the paper (Appendix A) and the authors' weights convention, independently of
``analyses.attention_tracing``: numpy only, dense matrices, plain loops.

1. Weights as TransformerLens gives them with ``fold_ln=True`` (the authors' default): ln_1's gain folded
   into W_Q, W_K, its bias into b_Q, b_K, and W_Q, W_K centred over d_model (``center=True``).
2. Normalised inputs x = (r - mean r) / sqrt(var r + eps) (TransformerLens ``ln1.hook_normalized``).
3. Omega_d = [W_Q W_K^T | W_Q b_K] (d x (d+1)), Omega_s = [W_Q W_K^T ; b_Q W_K^T] ((d+1) x d); dense SVD
   (torch, as the authors do for GPT-2), truncated to d_head.
4. Edge (dest i, src j): per singular component k the product x~_i U_k S_k V_k . x~_j, minus its mean
   over the other sources j' <= i ("comparative" contribution); destination side from Omega_d (x_i plain,
   x_j augmented with a 1), source side from Omega_s (x_i augmented).
5. Selection: contributions sorted in descending order, cumulative sum over their total, rounded to
   5 decimals; the signal is every component up to the first whose rounded share is >= 1.0. A side whose
   total is <= 0 has no signal (None).
"""
from __future__ import annotations

import numpy as np


def folded_qk(hf, layer: int, center: bool = True):
    """(W_Q [H, d, dh], b_Q [H, dh], W_K, b_K) of a GPT-2 HF model, float64, TransformerLens-style."""
    cfg = hf.config
    d, H = cfg.n_embd, cfg.n_head
    dh = d // H
    block = hf.transformer.h[layer]
    W = block.attn.c_attn.weight.detach().double().numpy()       # Conv1D: x @ W + b, [d, 3d]
    b = block.attn.c_attn.bias.detach().double().numpy()
    g = block.ln_1.weight.detach().double().numpy()
    beta = block.ln_1.bias.detach().double().numpy()
    out = []
    for part in (0, 1):                                          # q, k
        Wp = W[:, part * d:(part + 1) * d]
        bp = b[part * d:(part + 1) * d]
        Wh = np.stack([g[:, None] * Wp[:, h * dh:(h + 1) * dh] for h in range(H)])
        bh = np.stack([beta @ Wp[:, h * dh:(h + 1) * dh] + bp[h * dh:(h + 1) * dh] for h in range(H)])
        if center:
            Wh = Wh - Wh.mean(axis=1, keepdims=True)
        out += [Wh, bh]
    return out


def normalised_inputs(hf, input_ids) -> list[np.ndarray]:
    """x per layer [n, d] for one unpadded prompt (input_ids [n])."""
    import torch

    with torch.no_grad():
        hs = hf(input_ids[None], output_hidden_states=True).hidden_states
    xs = []
    for layer in range(hf.config.n_layer):
        r = hs[layer][0].double().numpy()
        eps = hf.transformer.h[layer].ln_1.eps
        c = r - r.mean(-1, keepdims=True)
        xs.append(c / np.sqrt((c ** 2).mean(-1, keepdims=True) + eps))
    return xs


class Reference:
    """Dense SVDs per (layer, head) and the selection rule."""

    def __init__(self, hf, center: bool = True):
        self.hf, self.center, self.svd = hf, center, {}

    def _svd(self, layer: int, head: int):
        import torch                     # torch's dense SVD, as the authors use for GPT-2 (numpy's LAPACK
                                         # oversubscribes threads on a busy machine)
        if (layer, head) not in self.svd:
            W_Q, b_Q, W_K, b_K = (t[head] for t in folded_qk(self.hf, layer, self.center))
            dh = W_Q.shape[1]
            base = W_Q @ W_K.T
            om_d = np.column_stack([base, W_Q @ b_K])
            om_s = np.vstack([base, (b_Q @ W_K.T)[None]])
            res = {}
            for side, om in (("d", om_d), ("s", om_s)):
                U, S, Vt = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(om), full_matrices=False))
                res[side] = (U[:, :dh], S[:dh], Vt[:dh])
            self.svd[(layer, head)] = res
        return self.svd[(layer, head)]

    def contributions(self, x: np.ndarray, layer: int, head: int, i: int, j: int, side: str) -> np.ndarray:
        """Comparative contribution of each singular component; side "d" (query) or "s" (key)."""
        U, S, Vt = self._svd(layer, head)[side]
        X = x[: i + 1]                                               # sources j' = 0..i
        ones = np.ones((i + 1, 1))
        if side == "d":
            prods = (x[i] @ U) * S * (np.hstack([X, ones]) @ Vt.T)   # [i + 1, dh]
        else:
            prods = (np.append(x[i], 1.0) @ U) * S * (X @ Vt.T)
        others = [jp for jp in range(i + 1) if jp != j]
        return prods[j] - prods[others].mean(0)

    @staticmethod
    def select(contrib: np.ndarray, thresh: float = 1.0):
        """Sorted indices of the selected components, or None when the total is <= 0."""
        total = contrib.sum()
        if total <= 0:
            return None
        order = np.argsort(-contrib, kind="stable")
        frac = np.cumsum(contrib[order]) / total
        last = int(np.where(frac.round(5) >= thresh)[0][0])
        return sorted(order[: last + 1].tolist())
