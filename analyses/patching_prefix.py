"""Activation patching that skips the work a patch cannot change: below the patched layer and before
the patched position.

A patch at (layer l, position p) leaves every activation at positions < p unchanged (causal attention)
and every activation below layer l unchanged. So a cell's patched run only needs positions p.. and
layers l..; the rest is the base run's. This module runs the same sweep as ``run_patching`` as:

- one base trace (the base run's key/value cache, its residual stream at the block starts, its metric)
  and one source trace (the source activations at every swept layer, its metric);
- per (layer block, position block) chunk, one forward over the tokens p0.. only (p0: the block's first
  position), with the base run's key/value cache for the positions < p0, the layers below the block
  skipped (``.skip()`` with the base run's residual stream), and every cell of the chunk (one row per
  cell and pair) patched at its own position.

With B layer blocks and B position blocks the work drops to about ((B + 1) / 2B)^2 of the plain sweep
(0.44 for B = 3; 0.3 in the limit of one block per layer and per position); results equal
``run_patching`` to float tolerance (tested).
Scope: ``by="position"`` with ``region="position"``, every site but ``unembed_in``, substitution or
deletion; anything else raises UserError (use ``run_patching``). The whole sweep is one
``model.session``: remotely one request, with the base run's cache and activations staying on the
server. Layer outputs are skipped with a tensor, which assumes transformers 5.x (tuple layer outputs in
4.x would need a tuple).
"""
from __future__ import annotations

import time

import torch

from analyses.patching import PatchConfig, PatchResult, _metric, patch_site, sweep_inputs
from interpkit.errors import UserError
from interpkit.kv_cache import layer_kv, positions, prefix_cache


def trace_reference(model, inputs: dict, site_name: str, layers: list, starts: list, n_heads: int, n_layers: int,
                    metric: str, answer, wrong, candidates, want_cache: bool, remote=False):
    """Source or base run: metric (saved), site activations at ``layers``, resid_pre at ``starts`` and
    (base) the key/value cache as per-layer (keys, values) tensors, which stay in the session."""
    with model.trace(inputs, remote=remote, use_cache=want_cache, logits_to_keep=1):
        acts = list()
        resid = list()
        for layer in range(max(layers + starts) + 1):
            if layer in starts:
                resid.append(patch_site(model, "resid_pre", layer).detach().clone())
            if layer in layers:
                acts.append(patch_site(model, site_name, layer, n_heads).detach().clone())
        out = model.output
        scores = _metric(metric, out.logits[:, -1], answer, wrong, candidates).detach().save()
        kv = list()
        if want_cache:
            for layer in range(n_layers):
                kv.append(layer_kv(out.past_key_values, layer))
    return scores, acts, resid, kv


def trace_suffix(model, inputs: dict, cache, start: int, skip_value, per_layer: list, site_name: str,
                 n_heads: int, deletion: bool, metric: str, answer, wrong, candidates, remote=False):
    """One chunk: tokens p0.. on top of the cached prefix; layers < start skipped; each row patched at its
    own (local) position."""
    with model.trace(inputs, remote=remote, past_key_values=cache, use_cache=True, logits_to_keep=1):
        for layer in range(start):
            model.layers[layer].skip(skip_value)
        for layer, rows, local, fill in per_layer:
            h = patch_site(model, site_name, layer, n_heads)
            h[rows, local] = torch.zeros_like(h[rows, local]) if deletion else fill
        values = _metric(metric, model.output.logits[:, -1], answer, wrong, candidates).detach().save()
    return values


def run_prefix_patching(lm, prompts, cfg: PatchConfig, candidates: torch.Tensor | None = None,
                        layer_blocks: int = 3, position_blocks: int = 3) -> PatchResult:
    """``run_patching(lm, prompts, cfg)`` computed on suffixes and upper layers only (module docstring).

    Cells are grouped into layer_blocks x position_blocks chunks (split further by ``cfg.max_rows``): a
    chunk starting at layer l0 and position p0 runs layers l0.. on tokens p0.. . More blocks skip more
    work; fewer blocks make fewer, larger forwards (better for GPUs and for weight-bandwidth-bound CPUs).
    """
    if cfg.by != "position" or cfg.region != "position" or cfg.site == "unembed_in":
        raise UserError("prefix reuse supports --by position --region position on layer sites; use run_patching")
    base, source, layers, cells, answer, wrong = sweep_inputs(lm, prompts, cfg, candidates)
    P = base["input_ids"].shape[0]
    blocks = _split(layers, layer_blocks)
    starts = [b[0] for b in blocks]
    order = sorted(range(len(cells)), key=lambda i: cells[i])
    chunks = []                                     # (layer block, p0, [(layer index, cell index)])
    for bi, block in enumerate(blocks):
        for pos_block in _split(order, position_blocks):
            grid = [(layers.index(l), ci) for l in block for ci in pos_block]
            chunks += [(bi, cells[pos_block[0]], part) for part in _parts(grid, max(1, cfg.max_rows // P))]
    args = (base, source, chunks, layers, cells, starts, cfg.site, lm.arch.n_heads, lm.arch.n_layers,
            cfg.mode == "deletion", cfg.metric, answer, wrong, candidates)
    t0 = time.perf_counter()
    model = lm.model
    if lm.remote:
        from interpkit.remote import ensure_shipped

        ensure_shipped()
    with torch.no_grad():
        with model.session(remote=lm.remote):
            out = list().save()
            out.append(prefix_sweep(model, *args))
    base_v, source_v, chunk_values = out[0]
    values = torch.full((P, len(layers), len(cells)), float("nan"))
    for (_, _, part), v in zip(chunks, chunk_values):
        for j, (li, ci) in enumerate(part):
            values[:, li, ci] = v[j * P:(j + 1) * P].float()
    if cfg.mode == "deletion":
        source_v = torch.zeros_like(base_v)
    return PatchResult(config=cfg, layers=layers, cells=cells, values=values, base=base_v.float(),
                       source=source_v.float(), method="exact",
                       timings={"sweep_s": time.perf_counter() - t0, "forwards": 2 + len(chunks)})


def prefix_sweep(model, base: dict, source: dict, chunks: list, layers: list, cells: list, starts: list,
                 site_name: str, n_heads: int, n_layers: int, deletion: bool, metric: str, answer, wrong,
                 candidates) -> tuple:
    """Every forward of the sweep, inside a session: the base and source runs, then one per chunk.
    Returns (base metric, source metric, per-chunk metrics [cells x pairs])."""
    ref = (layers, starts, n_heads, n_layers, metric, answer, wrong, candidates)
    base_v, _, base_resid, kv = trace_reference(model, base, site_name, *ref, True)
    source_v, src_acts, _, _ = trace_reference(model, source, site_name, *ref, False)
    P = base["input_ids"].shape[0]
    pos_ids = positions(base["attention_mask"])
    outs = []
    for bi, p0, part in chunks:
        n = len(part)
        per_layer = []
        for li in sorted({li for li, _ in part}):
            js = [j for j, (lj, _) in enumerate(part) if lj == li]
            rows = torch.cat([torch.arange(j * P, (j + 1) * P) for j in js])
            local = torch.tensor([cells[part[j][1]] - p0 for j in js]).repeat_interleave(P)
            fill = torch.cat([src_acts[li][:, cells[part[j][1]]] for j in js])
            per_layer.append((layers[li], rows, local, fill))
        inputs = {"input_ids": base["input_ids"][:, p0:].repeat(n, 1),
                  "attention_mask": base["attention_mask"].repeat(n, 1),
                  "position_ids": pos_ids[:, p0:].repeat(n, 1)}
        cache = prefix_cache(None, kv, p0, torch.arange(P).repeat(n))
        outs.append(trace_suffix(model, inputs, cache, starts[bi], base_resid[bi][:, p0:].repeat(n, 1, 1),
                                 per_layer, site_name, n_heads, deletion, metric, answer.repeat(n, 1),
                                 wrong.repeat(n, 1), candidates))
    return base_v, source_v, outs


def _split(items: list, n: int) -> list[list]:
    n = max(1, min(n, len(items)))
    size = -(-len(items) // n)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _parts(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
