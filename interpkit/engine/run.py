"""Running a planned sweep: locally chunk by chunk (progress, resumable), remotely as one session.

Both paths call the same trace code (``interpkit.engine.inside``). The base and source runs happen once
per sweep: locally their activations and the base run's key/value cache are kept in memory; remotely
they stay on the server inside the session and only the per-row metrics travel back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.engine.inside import run_chunk, trace_reference
from interpkit.engine.plan import Chunk, Plan


@dataclass
class SweepRuns:
    """The two runs of a sweep and how to score them."""

    base: dict                     # input_ids, attention_mask of the run being patched
    source: dict                   # ... of the run the activations come from
    site: str
    n_heads: int
    n_layers: int
    metric: str
    answer: torch.Tensor           # [pairs, k] answer ids (-1 pads)
    wrong: torch.Tensor
    candidates: torch.Tensor | None = None
    deletion: bool = False


@dataclass
class SweepOutput:
    base: torch.Tensor             # [pairs] metric of the base run
    source: torch.Tensor           # [pairs] metric of the source run
    values: torch.Tensor           # [pairs, layers, cells] metric of every patched row (skipped: base)
    requests: int = 0              # remote requests sent


def run_session(model, fn, jobs: list, remote) -> list:
    """``fn(model, *job)`` for every job inside one ``model.session`` (a single NDIF request)."""
    if not jobs:
        return []
    from interpkit.remote import ensure_shipped

    ensure_shipped()                       # our trace helpers travel by value: NDIF does not have them
    with model.session(remote=remote):
        outs = list().save()
        for job in jobs:
            outs.append(fn(model, *job))
    return outs


def chunk_job(chunk: Chunk, layers: list[int]) -> tuple:
    """A chunk as plain tensors and ints (what may travel to NDIF); source activations are indexed in
    ascending layer order, the order the reference run records them in."""
    order = sorted(layers)
    writes = [(w.layer, order.index(w.layer), w.rows, w.pairs, w.mask) for w in chunk.writes]
    return chunk.l0, chunk.p0, chunk.pairs, writes


def run_plan(model, plan: Plan, layers: list[int], runs: SweepRuns, remote=False, done: dict | None = None,
             on_chunk=None, progress=None) -> SweepOutput:
    """Execute ``plan``; ``done`` maps chunk index -> stored values (not rerun); ``on_chunk(i, values)``
    is called as each local chunk finishes; ``progress`` is an ``interpkit.progress.Stage``."""
    done = done or {}
    starts = plan.starts
    ref = (runs.site, runs.n_heads, runs.n_layers, runs.metric, runs.answer, runs.wrong, runs.candidates)
    todo = [c for c in plan.chunks if c.index not in done]
    if remote:
        from interpkit.engine.inside import remote_sweep
        from interpkit.remote import ensure_shipped

        ensure_shipped()
        base, source, deletion = runs.base, runs.source, runs.deletion     # plain values only: no dataclass
        jobs = [chunk_job(c, layers) for c in todo]                         # travels to NDIF (see inside.py)
        with model.session(remote=remote):
            outs = list().save()
            outs.append(remote_sweep(model, base, source, layers, starts, ref, deletion, jobs))
        base_v, source_v, fresh = outs[0]
        fresh = dict(zip([c.index for c in todo], fresh))
        for c in todo:
            if on_chunk is not None:
                on_chunk(c.index, torch.as_tensor(fresh[c.index]))
            if progress is not None:
                progress.advance()
        requests = 1
    else:
        with torch.no_grad():
            base_v, _, resid, kv = trace_reference(model, runs.base, runs.site, [], starts, runs.n_heads,
                                                   runs.n_layers, *ref[3:], bool(todo), True)
            source_v, acts, _, _ = trace_reference(model, runs.source, runs.site, layers if todo else [], [],
                                                   runs.n_heads, runs.n_layers, *ref[3:], False, True)
            fresh = {}
            for c in todo:
                fresh[c.index] = run_chunk(model, runs.base, kv, resid, acts, starts, ref, runs.deletion,
                                           chunk_job(c, layers)).float().cpu()
                if on_chunk is not None:
                    on_chunk(c.index, fresh[c.index])
                if progress is not None:
                    progress.advance()
        requests = 0
    base_v, source_v = torch.as_tensor(base_v).float().cpu(), torch.as_tensor(source_v).float().cpu()
    P = base_v.shape[0]
    values = base_v[:, None, None].expand(P, len(layers), plan.skipped.shape[2]).clone()
    for c in plan.chunks:
        out = torch.as_tensor(done[c.index] if c.index in done else fresh[c.index]).float()
        values[c.pairs, c.cells[:, 0], c.cells[:, 1]] = out
    return SweepOutput(base=base_v, source=source_v, values=values, requests=requests)
