"""The code that runs inside nnsight traces, locally and on NDIF: torch and our torch-only modules only.

A sweep is made of forwards of three kinds:

* a *full* forward (``trace_forward``): whole prompts, every layer; writes copy rows of the same batch
  (the source rows ride along) or write given values;
* a *reference* run (``trace_reference``): reports its metric and records activations and the key/value
  cache for the suffix runs;
* a *suffix* run (``trace_suffix``, one per chunk, prepared by ``run_chunk``): the chunk's rows from
  position p0 and layer l0 on, on top of the reference run's cache, layers < l0 skipped (their output is
  the reference's residual stream), writes filled from the reference's recorded activations.

Every edit of an activation is a ``Write`` applied by ``apply_write`` (the engine's one row copy); the
embedding output can be corrupted per row (``Noise``, ``corrupt``); what a forward reports is a
``Readout``. The records are dataclasses without a generated ``__repr__``: they travel to NDIF by value,
and a generated ``__repr__`` imports ``_thread``, which NDIF refuses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.kv_cache import layer_kv, positions, prefix_cache
from interpkit.metrics import kept_logits, score, sequence_prob
from interpkit.sites import site

UNEMBED_IN = "unembed_in"
ANSWER_PROB = "answer_prob"
"""Readout metric: the teacher-forced probability of one answer shared by every row (``sequence_prob``)."""
SITE_ORDER = {"resid_pre": 0, "head_out": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}
"""Forward order of the sites within a layer (``unembed_in`` comes after every layer)."""


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------
@dataclass(repr=False)
class Write:
    """One write at ``site`` of ``layer`` on rows ``rows`` of a forward.

    Index form (``pos`` set, [n] like ``rows``): ``x[rows, pos] = fill``; mask form (``mask`` set,
    [n, T, 1] or [n, T, H, 1] bool): ``x[rows] = where(mask, fill, x[rows])``. The fill is ``value`` if
    set; else, with ``record`` set, that recorded activation of the reference run at its rows ``src``
    (``run_chunk`` resolves it); else rows ``src`` of the same batch; else zeros. Positions count from
    the forward's first token."""

    site: str
    layer: int
    rows: torch.Tensor
    pos: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    src: torch.Tensor | None = None
    record: int | None = None
    value: torch.Tensor | None = None


@dataclass(repr=False)
class Noise:
    """Corruption of the embedding output: row b becomes ``corrupt(e[b], bank[rows[b]])``."""

    bank: torch.Tensor             # [n, T, d] added, or [n, T, d + 1]: the last channel 1 replaces
    rows: torch.Tensor             # [B] bank entry of each row


@dataclass(repr=False)
class Readout:
    """What a forward reports per row: ``metric`` (an ``interpkit.metrics.score`` name, or
    ``ANSWER_PROB``) read from the logits of the last positions (``kept``)."""

    metric: str
    answer: torch.Tensor           # [rows, k] per row; ANSWER_PROB: [K] for every row ([-1]: the first row's top-1)
    wrong: torch.Tensor | None = None
    candidates: torch.Tensor | None = None


@dataclass(repr=False)
class Forward:
    """One forward: ``writes`` in forward order. A full forward has whole prompts and ``l0`` 0; a suffix
    run (``run_chunk``) skips layers < l0 with ``start`` as their output, on ``cache`` (None: none)."""

    inputs: dict
    readout: Readout
    writes: list                   # [Write]
    noise: Noise | None = None
    n_heads: int = 0
    l0: int = 0
    start: torch.Tensor | None = None
    cache: object = None


@dataclass(repr=False)
class Reference:
    """A run whose metric is reported and whose ``records`` ((site, layer) in forward order) and, with
    ``cache``, key/value cache feed suffix runs. Its rows are the rows suffix runs start from."""

    inputs: dict
    readout: Readout
    records: list                  # [(site, layer)]
    noise: Noise | None = None
    cache: bool = False


@dataclass(repr=False)
class Suffix:
    """One suffix run: ``rows`` (a reference row each: its tokens, cache, starting state), tokens p0..,
    layers l0..; layers < l0 are skipped with the reference's record ``start`` (layer l0's input) as
    their output, and the writes below l0 (``resid_post`` of l0 - 1) edit that starting state. With
    ``cache`` the run sits on the reference's key/value cache of positions < p0 (empty at p0 = 0);
    without, the model's default applies (the two differ by float rounding, ~1e-7)."""

    p0: int
    l0: int
    rows: torch.Tensor
    writes: list                   # [Write], positions from p0
    start: int = -1                # record index (l0 > 0)
    cache: bool = True


@dataclass(repr=False)
class Sweep:
    """A reference run ``base`` (rows, cache, starting states), an optional run ``source`` whose records
    fill the writes (None: the base run's do), and the suffix runs."""

    base: Reference
    source: Reference | None
    chunks: list                   # [Suffix]
    n_layers: int
    n_heads: int = 0


@dataclass(repr=False)
class Recorded:
    """What a reference run leaves for its suffix runs (inside a session: on the server)."""

    values: torch.Tensor           # [rows] metric
    answer: torch.Tensor           # answer ids scored
    acts: list                     # activations in ``Reference.records`` order, every row and position
    kv: list                       # per layer (keys, values), or [] without ``cache``


def in_forward_order(records) -> list:
    """(site, layer) pairs sorted in the order a forward computes them, duplicates dropped."""
    def key(r):
        return (r[1] + 1, 0) if r[0] == UNEMBED_IN else (r[1], SITE_ORDER[r[0]])
    return sorted(set(records), key=key)


# --------------------------------------------------------------------------------------------------
# pieces of trace bodies
# --------------------------------------------------------------------------------------------------
def patch_site(model, name: str, layer: int, n_heads: int = 0) -> torch.Tensor:
    """``interpkit.sites.site`` plus ``unembed_in`` (the final norm's output; ``layer`` is ignored)."""
    if name == UNEMBED_IN:
        return model.final_norm.output
    return site(model, name, layer, n_heads)


def corrupt(e: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The corrupted embeddings: ``e + bank`` (additive noise) or, when ``bank`` has one more channel
    than ``e``, ``e * (1 - drop) + value`` (replacement where drop = 1; exact)."""
    if bank.shape[-1] == e.shape[-1]:
        return e + bank
    drop = bank[..., -1:]
    return e * (1 - drop) + bank[..., :-1]


def apply_noise(model, noise) -> None:
    """Corrupt the embedding output per row (nothing for ``noise`` None)."""
    if noise is not None:
        e = model.embed.output
        model.embed.output = corrupt(e, noise.bank.to(device=e.device, dtype=e.dtype)[noise.rows.to(e.device)])


def apply_write(x: torch.Tensor, w: Write) -> None:
    """The engine's one activation edit (``Write``): in place on the live activation ``x``."""
    if w.pos is not None:
        if w.value is not None:
            x[w.rows, w.pos] = w.value.to(device=x.device, dtype=x.dtype)
        elif w.src is not None:
            x[w.rows, w.pos] = x[w.src, w.pos]
        else:
            x[w.rows, w.pos] = 0
        return
    if w.value is not None:
        fill = w.value
    elif w.src is not None:
        fill = x[w.src]
    else:
        fill = torch.zeros_like(x[w.rows])
    x[w.rows] = torch.where(w.mask, fill, x[w.rows])


def apply_writes(model, writes: list, n_heads: int = 0) -> None:
    """Every write, each at its site (``writes`` in forward order)."""
    for w in writes:
        apply_write(patch_site(model, w.site, w.layer, n_heads), w)


def kept(r: Readout) -> int:
    """How many last positions' logits the readout reads."""
    return r.answer.shape[0] if r.metric == ANSWER_PROB else kept_logits(r.metric, r.answer)


def read(logits: torch.Tensor, r: Readout) -> tuple:
    """(metric per row, the answer ids scored): ANSWER_PROB resolves ``[-1]`` to the first row's top-1."""
    if r.metric == ANSWER_PROB:
        return sequence_prob(logits, r.answer)
    return score(r.metric, logits, r.answer, r.wrong, r.candidates), r.answer


def rows_readout(r: Readout, answer: torch.Tensor, rows: torch.Tensor) -> Readout:
    """The readout of a suffix run's rows: per-row answers follow their reference rows; a single answer
    (``answer`` resolved by the reference run) is shared."""
    if answer.dim() == 1:
        return Readout(r.metric, answer, r.wrong, r.candidates)
    return Readout(r.metric, answer[rows], None if r.wrong is None else r.wrong[rows], r.candidates)


# --------------------------------------------------------------------------------------------------
# traces
# --------------------------------------------------------------------------------------------------
def trace_forward(model, fwd: Forward) -> tuple:
    """One ``Forward``: noise, skipped layers, writes; (metric per row, answer ids)."""
    kw = {"past_key_values": fwd.cache, "use_cache": True} if fwd.cache is not None else {}
    with model.trace(fwd.inputs, logits_to_keep=kept(fwd.readout), **kw):
        apply_noise(model, fwd.noise)
        for layer in range(fwd.l0):
            model.layers[layer].skip(fwd.start)
        apply_writes(model, fwd.writes, fwd.n_heads)
        values, answer = read(model.output.logits, fwd.readout)
        values = values.detach().cpu().save()
        answer = answer.detach().cpu().save()
    return values, answer


def trace_reference(model, ref: Reference, n_layers: int, n_heads: int, keep: bool) -> Recorded:
    """One reference run (``Recorded``). ``keep`` saves everything (local runs); inside a session values
    flow without saving."""
    with model.trace(ref.inputs, use_cache=ref.cache, logits_to_keep=kept(ref.readout)):
        apply_noise(model, ref.noise)
        acts = list().save() if keep else list()
        kv = list().save() if keep else list()
        for name, layer in ref.records:
            acts.append(patch_site(model, name, layer, n_heads).detach().clone())
        out = model.output
        values, answer = read(out.logits, ref.readout)
        values = values.detach().cpu().save()
        answer = answer.detach().cpu().save()
        if ref.cache:
            for layer in range(n_layers):
                kv.append(layer_kv(out.past_key_values, layer))
    return Recorded(values, answer, acts, kv)


def trace_suffix(model, fwd: Forward) -> torch.Tensor:
    """One chunk's suffix run: the metric per row."""
    return trace_forward(model, fwd)[0]


def fill_write(w: Write, acts: list, p0: int) -> Write:
    """``w`` with a recorded activation (``w.record`` of the source run, rows ``w.src``) as its value."""
    if w.record is None:
        return w
    rec = acts[w.record]
    value = rec[w.src, w.pos + p0] if w.pos is not None else rec[w.src, p0:]
    return Write(w.site, w.layer, w.rows, w.pos, w.mask, None, None, value)


def run_chunk(model, sweep: Sweep, base: Recorded, source: Recorded, job: Suffix) -> torch.Tensor:
    """One suffix run (``Suffix``) on the base run's cache and starting states, its writes filled from
    the source run's records; the metric per row."""
    ref, rows, p0, l0 = sweep.base, job.rows, job.p0, job.l0
    mask = ref.inputs["attention_mask"]
    inputs = {"input_ids": ref.inputs["input_ids"][rows, p0:], "attention_mask": mask[rows],
              "position_ids": positions(mask)[rows, p0:]}
    cache = prefix_cache(None, base.kv, p0, rows) if job.cache else None
    start = base.acts[job.start][rows, p0:].clone() if l0 > 0 else None
    writes = list()
    for w in job.writes:
        w = fill_write(w, source.acts, p0)
        if w.layer < l0:
            apply_write(start, w)
        else:
            writes.append(w)
    noise = Noise(ref.noise.bank[:, p0:], ref.noise.rows[rows]) if ref.noise is not None and l0 == 0 else None
    return trace_suffix(model, Forward(inputs, rows_readout(ref.readout, base.answer, rows), writes, noise,
                                       sweep.n_heads, l0, start, cache))


def trace_sweep(model, sweep: Sweep) -> tuple:
    """Every forward of a sweep inside one session: (base metric, base answer ids, source metric or
    None, per-chunk metrics)."""
    base = trace_reference(model, sweep.base, sweep.n_layers, sweep.n_heads, False)
    source = base
    if sweep.source is not None:
        source = trace_reference(model, sweep.source, sweep.n_layers, sweep.n_heads, False)
    outs = list()
    for job in sweep.chunks:
        outs.append(run_chunk(model, sweep, base, source, job))
    return base.values, base.answer, None if sweep.source is None else source.values, outs
