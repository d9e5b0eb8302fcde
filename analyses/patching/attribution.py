"""Attribution patching: every activation-patching cell estimated to first order from one pass.

Patching a site's activation from ``a_base`` to ``a_source`` over a region R changes the metric by

    m(patched) - m(base)  ~=  sum over (t in R) of (a_source - a_base)[t] . dm/da[t]   (gradient at base)

(Nanda 2023, "Attribution patching"; Syed et al. 2023). One trace runs the source and base rows as one
batch, reads the site at every swept layer, and takes the gradient of the summed base-row metric with
respect to all of them in one backward (``with metric.backward(inputs=...)``: weight gradients are
neither computed nor accumulated). The products are reduced inside the trace to one number per
(pair, layer, position[, head]), so only those come back from NDIF; the region sums of each cell are
taken afterwards. The estimate is exact where the metric is linear in the site (``unembed_in`` under
logit difference), and comparable cell by cell with ``run_patching``: the result is a ``PatchResult``
(``method="attribution"``) whose values are base + estimated change. ``agreement`` reports Pearson r
and top-k overlap against an exact sweep.

Pairs are chunked to ``max_rows`` rows per trace; remotely every chunk goes in one session (one request).
"""
from __future__ import annotations

import time

import torch

from interpkit.analyses.patching.sweep import PatchConfig, PatchResult, region_mask, sweep_inputs
from interpkit.engine.inside import patch_site
from interpkit.engine.run import run_session
from interpkit.metrics import kept_logits, score


def _grad_site(model, site_name: str, layer: int) -> torch.Tensor:
    """The site as a tensor that is in the autograd graph (head_out: o_proj's input itself, not a view)."""
    if site_name == "head_out":
        return model.layers[layer].attn.o_proj.input
    return patch_site(model, site_name, layer)


def trace_attribution(model, inputs: dict, site_name: str, layers: list, n_heads: int, n_pairs: int,
                      deletion: bool, metric: str, answer, wrong, candidates, remote=False):
    """One forward + backward over [source rows; base rows]. Returns (metric per row [2P],
    per-layer contributions [P, T, H] for head_out or [P, T, 1] otherwise). Runs unchanged on NDIF."""
    with model.trace(inputs, remote=remote, logits_to_keep=kept_logits(metric, answer)):
        emb = model.embed.output
        if not emb.requires_grad:                   # frozen weights: still give the activations a graph
            emb.requires_grad_(True)
        acts = list()
        for layer in layers:
            acts.append(_grad_site(model, site_name, layer))
        values = score(metric, model.output.logits, answer, wrong, candidates)
        scores = values.detach().save()
        contrib = list().save()
        with values[n_pairs:].sum().backward(inputs=acts):
            for k in range(len(acts) - 1, -1, -1):      # gradients arrive in reverse forward order
                a = acts[k].detach()
                delta = -a[n_pairs:] if deletion else a[:n_pairs] - a[n_pairs:]
                prod = delta * acts[k].grad[n_pairs:]
                if site_name == "head_out":
                    prod = prod.view(prod.shape[0], prod.shape[1], n_heads, prod.shape[2] // n_heads)
                contrib.append(prod.sum(-1, keepdim=site_name != "head_out").detach())
    return scores, contrib


def _pair_chunks(n_pairs: int, max_rows: int) -> list[tuple[int, int]]:
    step = max(1, max_rows // 2)
    return [(s, min(s + step, n_pairs)) for s in range(0, n_pairs, step)]


def run_attribution(lm, prompts, cfg: PatchConfig, candidates: torch.Tensor | None = None,
                    on_chunk=None, done: dict | None = None) -> PatchResult:
    """The attribution-patching estimate of ``run_patching(lm, prompts, cfg)``, as a ``PatchResult``.

    ``on_chunk(i, arrays)`` is called as each chunk of pairs finishes (arrays: ``scores`` [2p] and
    ``contrib`` [layers, p, T, H or 1]); ``done`` maps chunk index -> such arrays (resumed runs).
    """
    inp = sweep_inputs(lm, prompts, cfg, candidates)
    base, source, layers, cells, answer, wrong = inp.base, inp.source, inp.layers, inp.cells, inp.answer, inp.wrong
    P, T = base["input_ids"].shape
    H = lm.arch.n_heads
    spans = _pair_chunks(P, cfg.max_rows)
    done = done or {}

    def job(lo, hi):
        return ({k: torch.cat([source[k][lo:hi], base[k][lo:hi]]) for k in base}, cfg.site, layers, H,
                hi - lo, cfg.mode == "deletion", inp.metric, answer[lo:hi].repeat(2, 1), wrong[lo:hi].repeat(2, 1),
                candidates)

    t0 = time.perf_counter()
    todo = [i for i in range(len(spans)) if i not in done]
    if lm.remote:
        fresh = run_session(lm.model, trace_attribution, [job(*spans[i]) for i in todo], lm.remote)
    else:
        fresh = []
        for i in todo:
            with torch.enable_grad():
                fresh.append(trace_attribution(lm.model, *job(*spans[i])))
    fresh = {i: {"scores": s, "contrib": torch.stack(list(c)[::-1])} for i, (s, c) in zip(todo, fresh)}
    scores, contrib = [], []
    for i, (lo, hi) in enumerate(spans):
        arrays = done.get(i) or fresh[i]
        if i in fresh and on_chunk is not None:
            on_chunk(i, arrays)
        s = torch.as_tensor(arrays["scores"]).float()
        scores.append((s[:hi - lo], s[hi - lo:]))
        contrib.append(torch.as_tensor(arrays["contrib"]).float())
    source_v = torch.cat([s for s, _ in scores])
    base_v = torch.cat([b for _, b in scores])
    per_pos = torch.cat(contrib, dim=1).permute(1, 0, 2, 3)        # [P, layers, T, H or 1]
    values = inp.fold(base_v[:, None, None] + _cell_sums(cfg, per_pos, cells, T))
    base_v, source_v = inp.fold(base_v), inp.fold(source_v)
    if cfg.mode == "deletion":
        source_v = torch.zeros_like(base_v)
    return PatchResult(config=cfg, layers=layers, cells=cells, values=values, base=base_v, source=source_v,
                       timings={"sweep_s": time.perf_counter() - t0, "forwards": len(spans), "backwards": len(spans)},
                       method="attribution")


def _cell_sums(cfg: PatchConfig, per_pos: torch.Tensor, cells: list[int], T: int) -> torch.Tensor:
    """Sum per-position (per-head) contributions over each cell's region: [P, layers, cells]."""
    if cfg.by == "head":
        return per_pos.sum(2)[..., cells]                             # a head at every position
    region = torch.stack([region_mask(cfg, c, T) for c in cells]).to(per_pos.dtype)   # [cells, T]
    return torch.einsum("plth,ct->plc", per_pos, region)              # all heads at the region's positions


def agreement(exact: PatchResult, approx: PatchResult, k: int = 10) -> dict:
    """How well ``approx`` (attribution) reproduces ``exact`` on the same cells.

    Compared on the mean normalised effect [layers, cells] (what the heatmaps show): Pearson r, top-k
    overlap of the cells with the largest |effect| (fraction of exact's top k also in approx's top k),
    and max |difference|; plus Pearson r of the raw per-pair metric changes.
    """
    if (exact.layers, exact.cells) != (approx.layers, approx.cells):
        raise ValueError("the two results cover different cells; run both with the same PatchConfig")
    a, b = exact.effect().flatten(), approx.effect().flatten()
    ok = a.isfinite() & b.isfinite()
    a, b = a[ok], b[ok]
    k = min(k, a.numel())
    top = lambda v: set(v.abs().topk(k).indices.tolist())  # noqa: E731
    da = (exact.values - exact.base[:, None, None]).flatten()
    db = (approx.values - approx.base[:, None, None]).flatten()
    return {"pearson": _pearson(a, b), "pearson_per_pair": _pearson(da, db),
            f"top{k}_overlap": len(top(a) & top(b)) / max(k, 1), "max_abs_diff": float((a - b).abs().max()),
            "cells": int(a.numel())}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
