"""The code that runs inside nnsight traces, locally and on NDIF: torch and our torch-only modules only.

Two kinds of forward make up a sweep: a *reference* run (the base or the source run, once per sweep)
and a *suffix* run (one chunk of patched rows, from the chunk's first position and layer on, on top of
the base run's key/value cache). Writes arrive as plain tuples (layer, rows, mask, fill): by-value
dataclasses would carry a generated ``__repr__`` that NDIF refuses.
"""
from __future__ import annotations

import torch

from interpkit.kv_cache import layer_kv, positions, prefix_cache
from interpkit.metrics import kept_logits, score
from interpkit.sites import first, site

UNEMBED_IN = "unembed_in"


def patch_site(model, name: str, layer: int, n_heads: int = 0) -> torch.Tensor:
    """``interpkit.sites.site`` plus ``unembed_in`` (the final norm's output; ``layer`` is ignored)."""
    if name == UNEMBED_IN:
        return model.final_norm.output
    return site(model, name, layer, n_heads)


def trace_reference(model, inputs: dict, site_name: str, layers: list, starts: list, n_heads: int,
                    n_layers: int, metric: str, answer, wrong, candidates, want_cache: bool, keep: bool):
    """One reference run: (metric, activations at the swept ``layers``, the residual stream entering each
    layer in ``starts`` (``n_layers``: the final norm's input), key/value cache per layer or []).
    ``keep`` saves everything (local runs); inside a session values flow without saving."""
    with model.trace(inputs, use_cache=want_cache, logits_to_keep=kept_logits(metric, answer)):
        acts = list().save() if keep else list()
        resid = list().save() if keep else list()
        kv = list().save() if keep else list()
        for layer in range(n_layers):
            if layer in starts:
                resid.append(first(model.layers[layer].input).detach().clone())
            if layer in layers and site_name != UNEMBED_IN:
                acts.append(site(model, site_name, layer, n_heads).detach().clone())
        if n_layers in starts:
            resid.append(first(model.layers[n_layers - 1].output).detach().clone())
        if site_name == UNEMBED_IN:
            acts.append(model.final_norm.output.detach().clone())
        out = model.output
        scores = score(metric, out.logits, answer, wrong, candidates).detach().save()
        if want_cache:
            for layer in range(n_layers):
                kv.append(layer_kv(out.past_key_values, layer))
    return scores, acts, resid, kv


def trace_suffix(model, inputs: dict, cache, l0: int, n_layers: int, skip_value, writes: list, site_name: str,
                 n_heads: int, metric: str, answer, wrong, candidates):
    """One chunk: its tokens on top of the cached prefix, layers < l0 skipped (their output is the base
    run's residual stream), every write ``(layer, rows, mask, fill)`` applied, the metric per row."""
    kw = dict(past_key_values=cache, use_cache=True) if l0 < n_layers else dict(use_cache=False)
    with model.trace(inputs, logits_to_keep=kept_logits(metric, answer), **kw):
        for layer in range(l0):
            model.layers[layer].skip(skip_value)
        for layer, rows, mask, fill in writes:
            h = patch_site(model, site_name, layer, n_heads)
            h[rows] = torch.where(mask, fill, h[rows])
        values = score(metric, model.output.logits, answer, wrong, candidates).detach().save()
    return values


def trace_full(model, inputs: dict, writes: list, site_name: str, n_heads: int, metric: str, answer, wrong,
               candidates):
    """The reference engine's forward: whole prompts, every layer, writes ``(layer, rows, mask, fill)``
    with ``fill`` a row index into the same batch (the source rows ride along) or a tensor."""
    with model.trace(inputs, logits_to_keep=kept_logits(metric, answer)):
        for layer, rows, mask, fill in writes:
            h = patch_site(model, site_name, layer, n_heads)
            value = torch.zeros_like(h[rows]) if fill is None else h[fill]
            h[rows] = torch.where(mask, value, h[rows])
        values = score(metric, model.output.logits, answer, wrong, candidates).detach().save()
    return values


def run_chunk(model, base: dict, kv: list, resid: list, acts: list, starts: list, ref: tuple, deletion: bool,
              job: tuple):
    """One planned chunk (``interpkit.engine.run.chunk_job``) on the base run's cache and activations."""
    site_name, n_heads, n_layers, metric, answer, wrong, candidates = ref
    l0, p0, pairs, writes = job
    inputs = {"input_ids": base["input_ids"][pairs, p0:], "attention_mask": base["attention_mask"][pairs],
              "position_ids": positions(base["attention_mask"])[pairs, p0:]}
    cache = prefix_cache(None, kv, p0, pairs) if l0 < n_layers else None
    skip_value = resid[starts.index(l0)][pairs, p0:] if l0 > 0 else None
    filled = list()
    for layer, li, rows, wpairs, mask in writes:
        fill = acts[li][wpairs, p0:]
        filled.append((layer, rows, mask, torch.zeros_like(fill) if deletion else fill))
    return trace_suffix(model, inputs, cache, l0, n_layers, skip_value, filled, site_name, n_heads, metric,
                        answer[pairs], wrong[pairs], candidates)


def remote_sweep(model, base: dict, source: dict, layers: list, starts: list, ref: tuple, deletion: bool,
                 jobs: list) -> tuple:
    """Every forward of a sweep inside one session: (base metric, source metric, per-chunk metrics)."""
    site_name, n_heads, n_layers, metric, answer, wrong, candidates = ref
    base_v, _, resid, kv = trace_reference(model, base, site_name, [], starts, n_heads, n_layers, metric, answer,
                                           wrong, candidates, len(jobs) > 0, False)
    source_v, acts, _, _ = trace_reference(model, source, site_name, layers if jobs else [], [], n_heads, n_layers,
                                           metric, answer, wrong, candidates, False, False)
    outs = list()
    for job in jobs:
        outs.append(run_chunk(model, base, kv, resid, acts, starts, ref, deletion, job))
    return base_v, source_v, outs
