"""A straightforward loop implementation of one prompt's trace, for benchmarks and as a correctness check.

It follows the reference code's structure (Franco & Crovella 2025, ``tracing.py``): Python loops over
singular components, sources, upstream heads, source tokens and positions; each upstream piece is
normalised, projected with the dense projector U_S U_S^T (or V_S V_S^T) and substituted into the
bilinear form; Omega's SVD is (optionally) a dense SVD of the d x (d+1) matrix per head and distance.
``trace.trace_prompt`` must give the same graph; ``bench/bench_attention_tracing.py`` times both.
"""
from __future__ import annotations

import networkx as nx
import torch

from interpkit.analyses.attention_tracing import graphs as gr
from interpkit.analyses.attention_tracing.signals import minimal_set
from interpkit.analyses.attention_tracing.trace import AttnTraceConfig, Frontier, candidate_node, seeds


class DenseSVD:
    """Omega's SVD by a dense torch SVD per (layer, head, side, delta), as the reference computes it."""

    def __init__(self, omega):
        self.omega, self.cache = omega, {}

    def __call__(self, layer, head, side, delta):
        key = (layer, head, side, self.omega.delta_key(delta))
        if key not in self.cache:
            U, S, Vh = torch.linalg.svd(self.omega.matrix(layer, head, side, delta), full_matrices=False)
            r = self.omega.arch.d_head
            self.cache[key] = (U[:, :r], S[:r], Vh[:r].T)
        return self.cache[key]


def _piece(dec, kind, l, h, t, p):
    """Residual-space vector of one upstream component at position p."""
    if kind == "head":
        v = dec.A[l, h, p, t] * dec.vW[l, h, t]
        return v * dec.post[l, p] if dec.post is not None else v
    if kind == "mlp":
        return dec.mlp[l, p]
    if kind == "attn_bias":
        return dec.bias[l] * dec.post[l, p] if dec.post is not None else dec.bias[l]
    return dec.embed[p]


def _normalised(dec, vec, sigma):
    vec = vec - vec.mean() if dec.centred else vec
    return vec / sigma


def _side_signal(omega, svd, dec, layer, head, d, s, side, share, decimals=None):
    """(comps [dh], basis [d, |S|], weights per position {p: (omega_p, vector)}) by loops."""
    f = omega.factors(layer)
    n = d + 1
    aug = lambda x: torch.cat([x, x.new_ones(1)])  # noqa: E731
    U, S, V = svd(layer, head, side, d - s)
    rank = U.shape[1]
    if side == "q":
        ys = [omega.matrix(layer, head, "q", d - p) @ aug(dec.xhat[layer, p]) for p in range(n)]
        r = ys[s] - sum(ys[p] for p in range(n) if p != s) / (n - 1)
        comps = torch.stack([f.scale * (dec.xhat[layer, d] @ U[:, k]) * (U[:, k] @ r) for k in range(rank)])
        sel = minimal_set(comps, share, decimals)
        return comps, U[:, sel], {d: (1.0, f.scale * r)}
    ls = [omega.matrix(layer, head, "k", d - p).T @ aug(dec.xhat[layer, d]) for p in range(n)]
    comps = []
    for k in range(rank):
        own = (ls[s] @ V[:, k]) * (V[:, k] @ dec.xhat[layer, s])
        rest = sum((ls[p] @ V[:, k]) * (V[:, k] @ dec.xhat[layer, p]) for p in range(n) if p != s)
        comps.append(f.scale * (own - rest / (n - 1)))
    comps = torch.stack(comps)
    sel = minimal_set(comps, share, decimals)
    return comps, V[:, sel], {p: (1.0 if p == s else -1.0 / (n - 1), f.scale * ls[p]) for p in range(n)}


def _upstream(dec, layer, pos_side, basis, weights, sigma, fold_after):
    """Candidate values in ``trace.Candidates`` order, by loops over heads, tokens and positions."""
    L_up, H = layer, dec.A.shape[1]
    last = fold_after

    def contrib(kind, l, h, t):
        total = 0.0
        for p, (w, r) in weights.items():
            vec = _normalised(dec, _piece(dec, kind, l, h, t, p), sigma[p])
            total = total + w * float((basis @ (basis.T @ vec)) @ r)
        return total

    heads, later = [], []
    for l in range(L_up):
        for h in range(H):
            for t in range(last + 1):
                heads.append(contrib("head", l, h, t))
    n = dec.n
    fold = pos_side == "k" and last + 1 < n
    if fold:
        for l in range(L_up):
            for h in range(H):
                later.append(sum(contrib("head", l, h, t) for t in range(last + 1, n)))
    mlp = [contrib("mlp", l, -1, -1) for l in range(L_up)]
    bias = [contrib("attn_bias", l, -1, -1) for l in range(L_up)] if dec.bias is not None else []
    embed = [contrib("embed", -1, -1, -1)]
    return torch.tensor(heads + later + mlp + bias + embed, dtype=torch.float64), (L_up, H, last + 1, len(later))


def _describe(i, shape, has_bias):
    l_up, H, t, n_later = shape
    nh = l_up * H * t
    if i < nh:
        l, r = divmod(i, H * t)
        return ("head", l, *divmod(r, t))
    i -= nh
    if i < n_later:
        return ("head", *divmod(i, H), -1)
    i -= n_later
    if i < l_up:
        return ("mlp", i)
    i -= l_up
    if has_bias and i < l_up:
        return ("attn_bias", i)
    return ("embed",)


def trace_prompt_reference(omega, dec, direction, labels, cfg: AttnTraceConfig, prompt: int = 0,
                           dense_svd: bool = True):
    """Same result as ``trace.trace_prompt`` (graph, n traced edge sides), computed with loops."""
    svd = DenseSVD(omega) if dense_svd else (lambda l, h, side, delta: omega.svd(l, h, side, delta))
    L, end = omega.arch.n_layers, dec.n - 1
    G = nx.MultiDiGraph(prompt=prompt, offset=dec.offset, n=dec.n)
    root = gr.node("root", L, -1, labels[end], "", end)
    basis = direction[:, None] / direction.norm()
    values, shape = _upstream(dec, L, "q", basis, {end: (1.0, direction)}, {end: dec.sigma_final[end]}, end)
    has_bias = dec.bias is not None
    sel = seeds(values, cfg)
    if len(sel) == 0:
        return None, 0
    frontier = Frontier(dec, cfg)
    for i in sel.tolist():
        desc = _describe(i, shape, has_bias)
        gr.add_edge(G, candidate_node(desc, end, labels), root, "logit", float(values[i]))
        frontier.push(desc, end)
    n_sides = 0
    while frontier and n_sides < 2 * cfg.max_edges:
        layer, head, d, s = frontier.pop()
        down = gr.node("head", layer, head, labels[d], labels[s], d, s)
        for side in ("q", "k"):
            n_sides += 1
            comps, B, weights = _side_signal(omega, svd, dec, layer, head, d, s, side, cfg.signal_share,
                                             cfg.signal_decimals)
            if B.shape[1] == 0:
                continue
            pos = d if side == "q" else s
            sigma = {p: dec.sigma[layer, p] for p in weights}
            values, shape = _upstream(dec, layer, side, B, weights, sigma, pos)
            for i in minimal_set(values, cfg.upstream_share).tolist():
                desc = _describe(i, shape, has_bias)
                gr.add_edge(G, candidate_node(desc, pos, labels), down, side, float(values[i]))
                frontier.push(desc, pos)
    return G, n_sides
