"""Signals of an attention edge: which singular components of Omega make head h at d attend to s.

Softmax is shift-invariant, so what makes d attend to s is its *relative* score: the score at s minus
the mean score over the other sources s' <= d (Franco & Crovella 2025, "comparative" contributions).
Each singular component k of Omega contributes a part of it; both sides are exact decompositions:

query side (U of Omega_q(d - s), the query input x^_d):
    rho = M(d-s) k_s - mean_{s'} M(d-s') k_{s'}                  (keys with bias, before rotary)
    comp_k = scale * (x^_d . U_k) (U_k . W_Q rho),   sum_k comp_k + scale * b_Q . rho = relative score
key side (V of Omega_k(d - s), the key inputs x^_p at the source and at the competitors):
    lam_p = V^T W_K M(d-p)^T q_d                                 (query with bias, before rotary)
    comp_k = scale * (lam_s,k (V_k . x^_s) - mean_{s'} lam_s',k (V_k . x^_s'))
    sum_k comp_k + scale * (q_d M(d-s) b_K - mean_{s'} q_d M(d-s') b_K) = relative score

Without rotary, M = I and these are the paper's augmented-form products with the source mean taken
out. With rotary, every competitor keeps its own M(d - s'); the column space of Omega(delta) does not
depend on delta, so Omega(d - s)'s singular vectors are a basis for all of them and the decomposition
stays exact. The "bias" term is the part of the relative score that does not pass through the side's
input (b_Q for the query side; the key bias, which cancels without rotary, for the key side).

The signal of a side is the minimal set of components, largest first, whose sum reaches ``share`` of
the total (the paper's ``frac_contrib_thresh``, default 1.0); a side whose total is <= 0 has no signal.
Gemma-2's attention softcap is monotone and applied after these (pre-softcap) scores. Competitors are
all sources 0..d: prompts must be shorter than a sliding attention window (Gemma-2, Mistral).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SideSignal:
    """The signal of one side of an edge and what upstream tracing needs from it.

    comps [dh]: relative contribution of each singular component; bias: the rest of the relative score;
    selected: indices of the minimal set; positions [P], B [d, r], C [P, r]: the signal as one direction
    per position of the side's normalised input (sum_p x^_p . B C[p] = comps[selected].sum());
    basis [d, |S|]: orthonormal basis of the signal subspace (U_S or V_S); ``core`` [d, dh]: all singular
    vectors of that side (for random controls), computed on demand from ``frame`` @ ``small``.
    """

    side: str
    edge: tuple[int, int, int, int]     # (layer, head, dest, src)
    comps: torch.Tensor
    bias: float
    selected: torch.Tensor
    positions: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    basis: torch.Tensor
    frame: torch.Tensor            # [d, dh] orthonormal frame (Q of W_Q or W_K)
    small: torch.Tensor            # [dh, dh] singular vectors in that frame

    @property
    def core(self) -> torch.Tensor:
        """All singular vectors of the side, [d, dh] (U or V)."""
        return self.frame @ self.small

    @property
    def total(self) -> float:
        return float(self.comps.sum())

    @property
    def selected_total(self) -> float:
        return float(self.comps[self.selected].sum())


def minimal_set(values: torch.Tensor, share: float, decimals: int | None = None) -> torch.Tensor:
    """Indices of the fewest largest values whose sum reaches ``share`` of the total (empty if total <= 0).

    ``decimals``: compare the cumulative fraction rounded to that many decimals (Franco & Crovella's rule,
    ``round(5) >= frac_contrib_thresh``: components past 1 - 5e-6 of the total are not needed); None: exact
    up to float rounding.
    """
    total = values.sum()
    if total <= 0 or values.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(values, descending=True, stable=True)
    csum = torch.cumsum(values[order], 0)
    if decimals is None:
        reached = csum >= share * total - 1e-12 * values.abs().sum()
    else:
        reached = torch.round(csum / total, decimals=decimals) >= share
    k = int(reached.nonzero()[0]) if bool(reached.any()) else len(values) - 1
    return order[: k + 1]


def _deltas(dest: int) -> torch.Tensor:
    return dest - torch.arange(dest + 1)


def query_components(omega, dec, layer: int, head: int, dest: int, srcs: torch.Tensor):
    """Query-side comps [len(srcs), dh], bias [len(srcs)], and (u, beta) per source for directions."""
    f = omega.factors(layer)
    n = dest + 1
    Ms = omega.rotations(_deltas(dest))                                      # [n, dh, dh] or None
    Kr = dec.k[layer, head, :n] if Ms is None else torch.einsum("nij,nj->ni", Ms, dec.k[layer, head, :n])
    rho = Kr[srcs] - (Kr.sum(0, keepdim=True) - Kr[srcs]) / (n - 1)          # [S, dh]
    u = omega.cores("q", dest - srcs, layer)[0][:, head]                     # [S, dh, dh]
    beta = torch.einsum("sjk,sj->sk", u, rho @ f.RA[head].T)                 # U_k . W_Q rho
    xi = torch.einsum("j,sjk->sk", dec.xhat[layer, dest] @ f.QA[head], u)    # x^_d . U_k
    return f.scale * xi * beta, f.scale * (rho @ f.b_Q[head]), u, beta


def key_components(omega, dec, layer: int, head: int, dest: int, srcs: torch.Tensor):
    """Key-side comps [len(srcs), dh], bias [len(srcs)], and (v, lam) per source for directions."""
    f = omega.factors(layer)
    n = dest + 1
    gam = _rotated_query(omega, dec, layer, head, dest)                     # M(d-p)^T q_d   [n, dh]
    v = omega.cores("k", dest - srcs, layer)[2][:, head].transpose(-1, -2)   # [S, dh, dh] (columns)
    lam = torch.einsum("sjk,pj->spk", v, gam @ f.RK[head].T)                 # V_k . W_K M^T q_d
    eta = torch.einsum("pj,sjk->spk", dec.xhat[layer, :n] @ f.QK[head], v)   # V_k . x^_p
    prod = lam * eta                                                         # [S, n, dh]
    idx = torch.arange(len(srcs))
    own = prod[idx, srcs]
    comps = f.scale * (own - (prod.sum(1) - own) / (n - 1))
    kb = gam @ f.b_K[head]                                                   # q_d M(d-p) b_K   [n]
    bias = f.scale * (kb[srcs] - (kb.sum() - kb[srcs]) / (n - 1))
    return comps, bias, v, lam


def edge_signal(omega, dec, layer: int, head: int, dest: int, src: int, side: str, share: float,
                decimals: int | None = None) -> SideSignal:
    """The signal of edge (layer, head, dest <- src) on ``side`` ("q" or "k"); needs dest >= 1.
    ``decimals``: see ``minimal_set`` (the trace uses the paper's 5)."""
    f = omega.factors(layer)
    components = query_components if side == "q" else key_components
    comps, bias, small, weight = components(omega, dec, layer, head, dest, torch.tensor([src]))
    comps, small, weight = comps[0], small[0], weight[0]         # (u, beta) on the query side, (v, lam) on the key side
    sel = minimal_set(comps, share, decimals)
    frame = f.QA[head] if side == "q" else f.QK[head]
    basis = frame @ small[:, sel]
    if side == "q":
        positions = torch.tensor([dest])
        C = (f.scale * weight[sel])[None]
    else:
        n = dest + 1
        positions = torch.arange(n)
        omega_w = torch.full((n,), -1.0 / (n - 1), dtype=weight.dtype)
        omega_w[src] = 1.0
        C = f.scale * omega_w[:, None] * weight[:, sel]
    return SideSignal(side=side, edge=(layer, head, dest, src), comps=comps, bias=float(bias[0]),
                      selected=sel, positions=positions, B=basis, C=C, basis=basis, frame=frame, small=small)


def relative_scores(omega, dec, layer: int, head: int, dest: int, side: str = "q"):
    """For every source s <= dest: (sum of components, bias term) of the relative score (tests, plots)."""
    srcs = torch.arange(dest + 1)
    fn = query_components if side == "q" else key_components
    comps, bias, _, _ = fn(omega, dec, layer, head, dest, srcs)
    return comps, bias


def raw_scores(omega, dec, layer: int, head: int, dest: int) -> torch.Tensor:
    """Pre-softmax (pre-softcap) scores of head at dest over sources 0..dest from the decomposition's q/k."""
    f = omega.factors(layer)
    gam = _rotated_query(omega, dec, layer, head, dest)
    return f.scale * (gam * dec.k[layer, head, : dest + 1]).sum(-1)


def _rotated_query(omega, dec, layer: int, head: int, dest: int) -> torch.Tensor:
    """M(dest - p)^T q_dest for p = 0..dest: [dest + 1, dh]."""
    q = dec.q[layer, head, dest]
    Ms = omega.rotations(_deltas(dest))
    return q.expand(dest + 1, -1) if Ms is None else torch.einsum("nji,j->ni", Ms, q)
