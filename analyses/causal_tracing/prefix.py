"""Causal tracing's planning on the sweep engine (``interpkit.engine``): restorations as writes, and the
prefix planner, which skips the work a restoration cannot change (the default engine).

A restoration of token t whose first write is at layer f leaves every activation at positions < t, and
every activation below layer f, equal to its corrupted sample's. So its rows need only tokens t.. and
layers f..; the rest comes from one reference forward (clean row + S corrupted rows) that also records
the key/value cache, the residual stream and the values the writes copy. On top of that:

* writes that cannot change the answer are dropped: before the subject (clean equals corrupted there)
  and at the last layer away from the last position (nothing reads them). A restoration left with no
  writes scores the corrupted probability; one whose only write is the last layer's residual at the last
  position scores the clean (or, held, the corrupted) probability;
* a hidden-state write at layer f - 1 becomes the rows' starting state, so a hidden restoration at layer
  l computes layers l + 1.. only;
* identical restorations (windows clipped at the ends of the model) are computed once.

Restorations are grouped into chunks by the sweep engine's planner (``interpkit.engine.plan.group_by_start``:
the grouping of least estimated cost, trading fewer forwards against less skipped work); a chunk
starting at position p0 and layer l0 is one forward over tokens p0.. with the corrupted samples' cache
for the positions < p0 and the layers < l0 skipped (``.skip`` with the starting state).
Results equal ``causal_tracing``'s batched engine to float tolerance (tested against the
plain-hook reference). A fact's plan becomes an engine ``Sweep`` (``fact_sweep``): the reference is the
base run (rows: clean + S corrupted samples, noise on the subject's embeddings), each chunk a ``Suffix``
whose writes copy the reference's recorded clean (or held corrupted) values. ``interpkit.engine.run``
runs the sweeps: remotely, one chunk of facts is one session (one request), the reference's activations
and cache staying on the server.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from interpkit.engine.inside import ANSWER_PROB, Noise, Readout, Reference, Suffix, Sweep, Write
from interpkit.engine.plan import ForwardCost, group_by_start, reaches_readout
from interpkit.engine.run import run_sweeps

ATTN, MLP, RESID = 0, 1, 2                        # sites within a layer, in forward order
SITE_IDS = {"attn": ATTN, "mlp": MLP, "hidden": RESID}
SITE_NAMES = ("attn_out", "mlp_out", "resid_post")   # interpkit.sites names of the three


@dataclass
class FactJob:
    """One fact as the engines run it: ``fact`` (a ``causal_tracing.Fact``; a multi-token answer's tokens
    but the last appended), its noise [S, n_subject, d(+1)], its restorations and the answer ids [K]
    (``[-1]``: the clean top-1)."""

    fact: object
    noise: torch.Tensor
    restorations: list
    answer: torch.Tensor


@dataclass
class FactScores:
    """What an engine reports for one fact."""

    values: torch.Tensor            # [R] mean restored probability per restoration, float64
    low: float                      # corrupted probability (mean over samples)
    high: float                     # clean probability
    answer: int


def noise_bank(fact, noise: torch.Tensor) -> torch.Tensor:
    """[samples + 1, T, d]: entry 0 (clean) is zero, entry 1 + s is sample s at the subject positions."""
    S, _, d = noise.shape
    bank = torch.zeros(S + 1, len(fact.ids), d)
    bank[1:, fact.subject_first:fact.subject_last + 1] = noise
    return bank


def window_layers(layer: int, window: int, n_layers: int) -> range:
    lo = max(0, layer - window // 2)
    return range(lo, min(n_layers, layer - window // 2 + window))


def restoration_writes(spec: tuple, window: int, n_layers: int) -> tuple:
    """The writes of one restoration as (layer, site, pos, held): ``held`` False copies the clean value,
    True the row's own corrupted-sample value. ``spec`` is (kind, pos, layer), or a 1-tuple (writes,)
    with writes (layer, site, pos, src): site "hidden" | "mlp" | "attn", src "clean" | "corrupted".

    Severed runs hold token t's MLP / attention outputs only in layers after ``layer``: holding them in
    earlier layers, or at ``layer`` itself (whose output h_t is overwritten), changes nothing, because up
    to there the restored row computes exactly what its corrupted sample row computes."""
    if not isinstance(spec[0], str):
        return tuple((lay, SITE_IDS[site_], pos, src == "corrupted") for lay, site_, pos, src in spec[0])
    kind, pos, layer = spec
    if kind == "hidden":
        return ((layer, RESID, pos, False),)
    if kind in ("mlp", "attn"):
        site_ = MLP if kind == "mlp" else ATTN
        return tuple((j, site_, pos, False) for j in window_layers(layer, window, n_layers))
    site_ = MLP if kind == "severed_mlp" else ATTN
    return ((layer, RESID, pos, False),) + tuple((j, site_, pos, True) for j in range(layer + 1, n_layers))


@dataclass
class Chunk:
    """One forward: restorations ``items`` (indices into FactPlan.unique), S rows each, tokens p0..,
    layers l0.. ."""

    p0: int
    l0: int
    items: list[int]


@dataclass
class FactPlan:
    """How one fact's restorations are computed: ``source[r]`` is ("low",), ("high",) or ("unique", u)."""

    unique: list[tuple]             # normalised writes (layer, site, pos, held) of each distinct restoration
    source: list[tuple]
    chunks: list[Chunk]
    sites: list[int]                # sites the reference forward records (forward order)


def normalise(writes: tuple, live) -> tuple:
    """The writes that can change the answer, sorted; ``live(layer, site)`` is the [T] bool of positions
    where a write can (``interpkit.engine.plan.reaches_readout``: not before the subject, and at the last
    layer only where logits are read)."""
    return tuple(sorted({w for w in writes if live(w[0], w[1])[w[2]]}))


def first_layer(writes: tuple) -> int:
    """The first layer a restoration's rows must compute: a residual write at layer l starts them at l + 1."""
    return min(lay + 1 if site_ == RESID else lay for lay, site_, _, _ in writes)


@dataclass(frozen=True)
class FactShape:
    """What planning a fact needs besides its restorations: its length, where the subject starts, the
    model's depth, the window and samples of the trace, the rows per forward, how many last positions'
    logits score the answer (a multi-token answer's length) and the cost of a forward (how rows group)."""

    n_tokens: int
    subject_first: int
    n_layers: int
    window: int
    samples: int
    max_rows: int
    n_read: int = 1
    cost: ForwardCost = field(default_factory=ForwardCost)


def plan_fact(restorations: list, shape: FactShape) -> FactPlan:
    """The distinct restorations that need computing and their grouping into forwards (module doc)."""
    T, L, S = shape.n_tokens, shape.n_layers, shape.samples
    first = torch.tensor([shape.subject_first])

    @functools.cache
    def live(layer: int, site_: int) -> torch.Tensor:
        return reaches_readout(first, layer, SITE_NAMES[site_], L, T, shape.n_read)[0]

    unique: list[tuple] = []
    index: dict[tuple, int] = {}
    source = []
    for spec in restorations:
        w = normalise(restoration_writes(spec, shape.window, L), live)
        if not w:
            source.append(("low",))
        elif first_layer(w) == L and shape.n_read == 1:     # only h^(L-1) at the last position is written
            source.append(("low",) if w[0][3] else ("high",))
        else:
            if w not in index:
                index[w] = len(unique)
                unique.append(w)
            source.append(("unique", index[w]))
    starts = [(min(x[2] for x in w), first_layer(w), S) for w in unique]
    chunks = [Chunk(p0, l0, items) for p0, l0, items in group_by_start(starts, T, L, shape.max_rows, shape.cost)]
    sites = sorted({x[1] for w in unique for x in w} | {RESID})
    return FactPlan(unique, source, chunks, sites)


# --------------------------------------------------------------------------------------------------
# a fact's plan as an engine sweep
# --------------------------------------------------------------------------------------------------
def chunk_suffix(plan: FactPlan, chunk: Chunk, samples: int) -> Suffix:
    """One chunk as an engine ``Suffix``: S rows per restoration (reference rows 1..S), its writes copying
    the reference's recorded values (row 0 clean, or the row's own sample 1 + s where held); the residual
    written at layer l0 - 1 becomes the starting state."""
    S, p0, l0, k = samples, chunk.p0, chunk.l0, len(plan.sites)
    per_site: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for i, u in enumerate(chunk.items):
        for lay, site_, pos, held in plan.unique[u]:
            per_site.setdefault((lay, site_), []).append((i, pos, int(held)))
    offsets = torch.arange(S)
    writes = []
    for (lay, site_), entries in sorted(per_site.items()):      # forward order
        e = torch.tensor(entries)
        writes.append(Write(SITE_NAMES[site_], lay, rows=(e[:, :1] * S + offsets).reshape(-1),
                            pos=e[:, 1].repeat_interleave(S) - p0, src=(e[:, 2:] * (offsets + 1)).reshape(-1),
                            record=lay * k + plan.sites.index(site_)))
    start = (l0 - 1) * k + plan.sites.index(RESID) if l0 > 0 else -1
    return Suffix(p0=p0, l0=l0, rows=torch.arange(1, S + 1).repeat(len(chunk.items)), writes=writes, start=start,
                  cache=p0 > 0)


def fact_sweep(job: FactJob, plan: FactPlan, samples: int, n_layers: int) -> Sweep:
    """One fact's forwards: the reference (clean row + S corrupted rows, recording ``plan.sites`` at every
    layer and the cache), then one suffix run per chunk."""
    ids, B = job.fact.ids, samples + 1
    inputs = {"input_ids": ids[None].expand(B, -1), "attention_mask": torch.ones(B, ids.shape[0], dtype=torch.long)}
    records = [(SITE_NAMES[s], layer) for layer in range(n_layers) for s in plan.sites]
    ref = Reference(inputs, Readout(ANSWER_PROB, job.answer), records,
                    Noise(noise_bank(job.fact, job.noise), torch.arange(B)), cache=True)
    return Sweep(ref, None, [chunk_suffix(plan, c, samples) for c in plan.chunks], n_layers)


def trace_facts_prefix(lm, todo: list[FactJob], cfg) -> list[FactScores]:
    """Every fact's sweep; one session (one request) remotely."""
    S, L = cfg.samples, lm.arch.n_layers
    cost = ForwardCost.for_model(lm.arch)
    plans = [plan_fact(j.restorations, FactShape(len(j.fact.ids), j.fact.subject_first, L, cfg.window, S, cfg.max_rows,
                                                 len(j.answer), cost)) for j in todo]
    outs = run_sweeps(lm.model, [fact_sweep(j, plan, S, L) for j, plan in zip(todo, plans)], lm.remote)
    results = []
    for plan, out in zip(plans, outs):
        p = out.base.double()
        high, low = float(p[0]), float(p[1:].mean())
        values = torch.zeros(len(plan.unique), dtype=torch.float64)
        for chunk, q in zip(plan.chunks, out.chunks):
            values[chunk.items] = q.double().view(-1, S).mean(1)
        by = {"low": low, "high": high}
        results.append(FactScores(torch.tensor([values[s[1]].item() if s[0] == "unique" else by[s[0]]
                                                for s in plan.source], dtype=torch.float64),
                                  low, high, int(out.answer.view(-1)[0])))
    return results
