"""Running a planned sweep: locally chunk by chunk (progress, resumable), remotely as one session.

Both paths call the same trace code (``interpkit.engine.inside``). The base and source runs happen once
per sweep: locally their activations and the base run's key/value cache are kept in memory; remotely
they stay on the server inside the session and only the per-row metrics travel back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.engine.inside import (Forward, Readout, Reference, Suffix, Sweep, Write, in_forward_order, only_read_ids,
                                     run_chunk, trace_forward, trace_references, trace_sweep)
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


def run_traces(model, fn, jobs: list, remote=False, progress=None) -> list:
    """``fn(model, *job)`` for every job: one by one without gradients locally, one session (one
    request) remotely. ``progress`` (an ``interpkit.progress.Stage``) advances once per job (remotely:
    all at once when the session returns)."""
    if remote:
        outs = run_session(model, fn, jobs, remote)
        if progress is not None:
            progress.advance(len(jobs))
        return outs
    outs = []
    with torch.no_grad():
        for job in jobs:
            outs.append(fn(model, *job))
            if progress is not None:
                progress.advance()
    return outs


def run_forwards(model, forwards: list[Forward], remote=False, progress=None) -> list[tuple]:
    """``trace_forward`` of every forward: (metric per row, answer ids[, recorded activations]) each."""
    return run_traces(model, trace_forward, [(f,) for f in forwards], remote, progress)


@dataclass
class SweepValues:
    """What a sweep reports."""

    base: torch.Tensor             # [rows] metric of the base run
    answer: torch.Tensor           # answer ids the base run scored
    source: torch.Tensor | None    # [rows] metric of the source run (None: no source run)
    chunks: list                   # [chunk rows] metric of each suffix run, in ``Sweep.chunks`` order


def run_sweeps(model, sweeps: list[Sweep], remote=False, on_chunk=None, progress=None) -> list[SweepValues]:
    """Execute sweeps: locally the reference runs once each (their records kept in memory) and the
    chunks one by one; remotely every forward of every sweep in one session (one request), the records
    and caches never leaving the server. ``on_chunk(i, j, values)`` follows chunk j of sweep i;
    ``progress`` (an ``interpkit.progress.Stage``) advances once per chunk."""
    out = []
    with torch.no_grad():
        if remote:
            for base, answer, source, chunks in run_session(model, trace_sweep, [(s,) for s in sweeps], remote):
                out.append(SweepValues(torch.as_tensor(base), torch.as_tensor(answer),
                                       None if source is None else torch.as_tensor(source),
                                       [torch.as_tensor(v) for v in chunks]))
        for i, sweep in enumerate(sweeps):
            if remote:
                chunks = out[i].chunks
            else:
                base, source = trace_references(model, sweep, True)
                chunks = []
                out.append(SweepValues(base.values, base.answer, None if sweep.source is None else source.values,
                                       chunks))
            for j, job in enumerate(sweep.chunks):
                if not remote:
                    chunks.append(run_chunk(model, sweep, base, source, job))
                if on_chunk is not None:
                    on_chunk(i, j, chunks[j])
                if progress is not None:
                    progress.advance()
    return out


# -- activation patching's plan (``interpkit.engine.plan``) as a sweep -------------------------------------
def patching_sweep(plan: Plan, layers: list[int], runs: SweepRuns, chunks: list[Chunk]) -> Sweep:
    """The base run records the residual stream where ``chunks`` start (and keeps its cache), the source
    run the swept site at ``layers``; each chunk's rows take the source activation (deletion: zeros)."""
    L = runs.n_layers
    readout = only_read_ids(Readout(runs.metric, runs.answer, runs.wrong, runs.candidates))
    starts = [l0 for l0 in plan.starts if 0 < l0] if chunks else []
    base_records = [("resid_pre", l0) if l0 < L else ("resid_post", L - 1) for l0 in starts]
    base_records = in_forward_order(base_records)
    source_records = in_forward_order([(runs.site, layer) for layer in layers] if chunks else [])

    def start_of(l0: int) -> int:
        return base_records.index(("resid_pre", l0) if l0 < L else ("resid_post", L - 1)) if l0 > 0 else -1

    def record_of(layer: int) -> int:
        return source_records.index((runs.site, layer))

    jobs = []
    for c in chunks:
        writes = [Write(runs.site, w.layer, w.rows, mask=w.mask, src=None if runs.deletion else w.pairs,
                        record=None if runs.deletion else record_of(w.layer)) for w in c.writes]
        jobs.append(Suffix(p0=c.p0, l0=c.l0, rows=c.pairs, writes=writes, start=start_of(c.l0), cache=c.l0 < L))
    return Sweep(base=Reference(runs.base, readout, base_records, cache=bool(chunks)),
                 source=Reference(runs.source, readout, source_records), chunks=jobs, n_layers=L,
                 n_heads=runs.n_heads)


def run_plan(model, plan: Plan, layers: list[int], runs: SweepRuns, remote=False, done: dict | None = None,
             on_chunk=None, progress=None) -> SweepOutput:
    """Execute ``plan``; ``done`` maps chunk index -> stored values (not rerun); ``on_chunk(i, values)``
    is called as each chunk finishes; ``progress`` is an ``interpkit.progress.Stage``."""
    done = done or {}
    todo = [c for c in plan.chunks if c.index not in done]
    fresh = {}

    def finished(i: int, j: int, values: torch.Tensor) -> None:
        fresh[todo[j].index] = values = values.float().cpu()
        if on_chunk is not None:
            on_chunk(todo[j].index, values)

    sweep = patching_sweep(plan, layers, runs, todo)
    out = run_sweeps(model, [sweep], remote, finished, progress)[0]
    base_v, source_v = out.base.float().cpu(), out.source.float().cpu()
    P = base_v.shape[0]
    values = base_v[:, None, None].expand(P, len(layers), plan.skipped.shape[2]).clone()
    for c in plan.chunks:
        v = torch.as_tensor(done[c.index] if c.index in done else fresh[c.index]).float()
        values[c.pairs, c.cells[:, 0], c.cells[:, 1]] = v
    return SweepOutput(base=base_v, source=source_v, values=values, requests=1 if remote else 0)
