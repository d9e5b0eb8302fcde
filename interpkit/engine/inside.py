"""The code that runs inside nnsight traces, locally and on NDIF: torch and our torch-only modules only.

A sweep is made of forwards of three kinds:

* a *full* forward (``trace_forward``): whole prompts, every layer; writes copy rows of the same batch
  (the source rows ride along) or write given values;
* a *reference* run (``trace_reference``): reports its metric and records activations and the key/value
  cache for the suffix runs;
* a *suffix* run (``trace_suffix``, one per chunk, prepared by ``run_chunk``): the chunk's rows from
  position p0 and layer l0 on, on top of the reference run's cache, layers < l0 skipped (their output is
  the reference's residual stream), writes filled from the reference's recorded activations.

Every edit of an activation is a ``Write`` applied by ``apply_write`` (the engine's one row copy; it
can also take its fill from other positions, from rows of a table of values, or replace only the
component in a subspace); an edit of single heads' attention scores is a ``ScoreAdd``; a suffix run's
last-layer MLP computed at the read positions alone is an ``MlpTail``; the embedding
output can be corrupted per row (``Noise``, ``corrupt``); what a forward reports is a ``Readout`` (a
metric, or candidate logits, and optionally activations at some sites). The records are dataclasses
without a generated ``__repr__``: they travel to NDIF by value, and a generated ``__repr__`` imports
``_thread``, which NDIF refuses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.kv_cache import layer_kv, positions, prefix_cache
from interpkit.metrics import kept_logits, score, sequence_prob
from interpkit.sites import attention_pattern, site

UNEMBED_IN = "unembed_in"
FINAL_IN = "final_in"
"""Site: the final norm's input (the residual stream after the last layer: ``resid_pre`` of layer
n_layers); writes and records there pass ``layer`` = n_layers."""
ATTN_SCORES = "attn_scores"
"""Site of a ``ScoreAdd``: the pre-softmax attention scores (the attention function's additive mask)."""
ATTN_PATTERN = "attn_pattern"
"""Site to record: the post-softmax attention [batch, head, dest, src] (``interpkit.sites.attention_pattern``)."""
ANSWER_PROB = "answer_prob"
"""Readout metric: the teacher-forced probability of one answer shared by every row (``sequence_prob``)."""
LOGITS = "logits"
"""Readout "metric": the last position's logits of the ``candidates`` ids, [rows, k] in float."""
MLP_TAIL = "mlp_tail"
"""Site of a ``MlpTail``: the MLP's call (after attention, before ``mlp_out``)."""
SITE_ORDER = {"resid_pre": 0, ATTN_SCORES: 0.5, "head_out": 1, "attn_out": 2, ATTN_PATTERN: 2, MLP_TAIL: 2.5,
              "mlp_out": 3, "resid_post": 4}
"""Forward order of the sites within a layer (``final_in``, then ``unembed_in``, come after every layer)."""


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------
@dataclass(repr=False)
class Write:
    """One write at ``site`` of ``layer`` on rows ``rows`` of a forward.

    Index form (``pos`` set, [n] like ``rows``): ``x[rows, pos] = fill``; mask form (``mask`` set,
    [n, T, 1] or [n, T, H, 1] bool): ``x[rows] = where(mask, fill, x[rows])``. The fill is ``value`` if
    set (index form: rows ``take`` of it when set, e.g. one of a few points per row); else, with
    ``record`` set, that recorded activation of the reference run at its rows ``src`` (``run_chunk``
    resolves it); else rows ``src`` of the same batch (index form: at positions ``src_pos`` when set,
    else ``pos``); else zeros. With ``basis`` ([d, k] orthonormal columns; index form) only the
    component in span(basis) is replaced: ``x + ((fill - x) @ basis) @ basis.T``. Positions count from
    the forward's first token."""

    site: str
    layer: int
    rows: torch.Tensor
    pos: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    src: torch.Tensor | None = None
    record: int | None = None
    value: torch.Tensor | None = None
    src_pos: torch.Tensor | None = None
    take: torch.Tensor | None = None
    basis: torch.Tensor | None = None


@dataclass(repr=False)
class ScoreAdd:
    """Add ``values`` [n] to the pre-softmax attention scores of layer ``layer`` at ``index`` [n, 4] =
    (row, head, dest, src), through the attention function's additive mask (so one head changes even
    under grouped-query attention); sparse, so a remote request carries a few numbers per edit."""

    layer: int
    index: torch.Tensor
    values: torch.Tensor
    site: str = ATTN_SCORES


@dataclass(repr=False)
class MlpTail:
    """The MLP of ``layer`` run at the last ``keep`` positions only, zeros elsewhere. Exact for the last
    layer of a forward that reads the logits of those positions and records nothing: its MLP output at
    the other positions reaches no logit read (they feed no later layer), while their keys and values
    still come from the attention, which runs in full. Saves (T - keep) / T of the last layer's MLP."""

    layer: int
    keep: int
    site: str = MLP_TAIL


@dataclass(repr=False)
class Noise:
    """Corruption of the embedding output: row b becomes ``corrupt(e[b], bank[rows[b]])``."""

    bank: torch.Tensor             # [n, T, d] added, or [n, T, d + 1]: the last channel 1 replaces
    rows: torch.Tensor             # [B] bank entry of each row


@dataclass(repr=False)
class Readout:
    """What a forward reports per row: ``metric`` (an ``interpkit.metrics.score`` name, ``ANSWER_PROB``,
    or ``LOGITS``) read from the logits of the last positions (``kept``; ``keep`` overrides how many
    the model computes, 0: every position, as a plain forward); with ``records`` ((site, layer) in
    forward order) also those activations, every row (``trace_forward``'s third result). With ``vocab``
    the unembedding computes those ids' logits only, and every id in the readout indexes ``vocab``."""

    metric: str
    answer: torch.Tensor           # [rows, k] per row; ANSWER_PROB: [K] for every row ([-1]: the first row's top-1)
    wrong: torch.Tensor | None = None
    candidates: torch.Tensor | None = None
    records: list | None = None    # [(site, layer)]
    keep: int | None = None
    vocab: torch.Tensor | None = None   # ids whose logits alone are computed (``only_read_ids``)


@dataclass(repr=False)
class Forward:
    """One forward: ``writes`` in forward order. A full forward has whole prompts and ``l0`` 0; a suffix
    run (``run_chunk``) skips layers < l0 with ``start`` as their output, on ``cache`` (None: none)."""

    inputs: dict
    readout: Readout
    writes: list                   # [Write | ScoreAdd | MlpTail]
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


def order_key(name: str, layer: int) -> tuple:
    """Where (site, layer) comes in a forward (``final_in`` at layer n_layers, ``unembed_in`` at any)."""
    if name == UNEMBED_IN:
        return (layer + 1, 0)
    return (layer, -1) if name == FINAL_IN else (layer, SITE_ORDER[name])


def in_forward_order(records) -> list:
    """(site, layer) pairs sorted in the order a forward computes them, duplicates dropped."""
    return sorted(set(records), key=lambda r: order_key(r[0], r[1]))


# --------------------------------------------------------------------------------------------------
# pieces of trace bodies
# --------------------------------------------------------------------------------------------------
def patch_site(model, name: str, layer: int, n_heads: int = 0) -> torch.Tensor:
    """``interpkit.sites.site`` plus ``unembed_in`` (the final norm's output; ``layer`` is ignored),
    ``final_in`` (its input) and ``attn_pattern`` (the post-softmax attention of ``layer``)."""
    if name == UNEMBED_IN:
        return model.final_norm.output
    if name == FINAL_IN:
        return model.final_norm.input
    if name == ATTN_PATTERN:
        return attention_pattern(model, layer)
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
            fill = w.value.to(device=x.device, dtype=x.dtype)
            if w.take is not None:
                fill = fill[w.take.to(x.device)]
        elif w.src is not None:
            fill = x[w.src, w.pos if w.src_pos is None else w.src_pos]
        else:
            fill = 0
        if w.basis is not None:
            V = w.basis.to(device=x.device, dtype=x.dtype)
            old = x[w.rows, w.pos]
            fill = old + ((fill - old) @ V) @ V.T
        x[w.rows, w.pos] = fill
        return
    if w.value is not None:
        fill = w.value
    elif w.src is not None:
        fill = x[w.src]
    else:
        fill = torch.zeros_like(x[w.rows])
    x[w.rows] = torch.where(w.mask, fill, x[w.rows])


def add_scores(model, a: ScoreAdd, n_heads: int) -> None:
    """``ScoreAdd``: its values added to the additive attention mask of layer ``a.layer``, per head."""
    op = model.layers[a.layer].attn.source.attention_interface_1
    args, kwargs = op.inputs
    mask = args[4]
    idx = a.index.to(mask.device)
    add = torch.zeros(mask.shape[0], n_heads, mask.shape[2], mask.shape[3], dtype=mask.dtype, device=mask.device)
    add[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]] = a.values.to(device=mask.device, dtype=mask.dtype)
    op.inputs = ((*args[:4], mask + add, *args[5:]), kwargs)


def mlp_tail(model, t: MlpTail) -> None:
    """``MlpTail``: the MLP computed on its input's last ``t.keep`` positions, zeros before them."""
    mlp = model.layers[t.layer].mlp
    x = mlp.input
    y = mlp(x[:, -t.keep:].contiguous())
    out = torch.zeros(x.shape[0], x.shape[1], y.shape[-1], dtype=y.dtype, device=y.device)
    out[:, -t.keep:] = y
    mlp.skip(out)


def record(model, name: str, layer: int, n_heads: int = 0) -> torch.Tensor:
    """A copy of the activation at (site, layer) on the cpu (later in-place writes do not reach it)."""
    return patch_site(model, name, layer, n_heads).detach().to("cpu", copy=True)


def apply_writes(model, writes: list, n_heads: int = 0, records: list | None = None, out: list | None = None) -> None:
    """Every write (``Write``, ``ScoreAdd`` or ``MlpTail``), each at its site (``writes`` in forward order); with
    ``records`` ((site, layer) in forward order) those activations appended to ``out`` as the forward
    reaches them, each after the writes at its site."""
    records = records or []
    i = 0
    for w in writes:
        key = order_key(w.site, w.layer)
        while i < len(records) and order_key(records[i][0], records[i][1]) < key:
            out.append(record(model, records[i][0], records[i][1], n_heads))
            i += 1
        if w.site == ATTN_SCORES:
            add_scores(model, w, n_heads)
        elif w.site == MLP_TAIL:
            mlp_tail(model, w)
        else:
            apply_write(patch_site(model, w.site, w.layer, n_heads), w)
    for name, layer in records[i:]:
        out.append(record(model, name, layer, n_heads))


READS_IDS = ("logit_diff", "margin")
"""Metrics that read the logits of a few ids only (not a softmax over the vocabulary)."""


def only_read_ids(r: Readout) -> Readout:
    """``r`` computing only the logits its metric reads (a few columns of the unembedding instead of all
    of them: at 49k ids the unembedding costs as much as eight layers of a 135M model): ids become
    indices into ``vocab`` (-1 padding stays). Other metrics are returned unchanged."""
    if r.metric not in READS_IDS:
        return r
    ids = torch.cat([t.reshape(-1) for t in (r.answer, r.wrong, r.candidates) if t is not None])
    vocab = ids[ids >= 0].unique()

    def local(t):
        return None if t is None else torch.where(t >= 0, torch.searchsorted(vocab, t.clamp_min(0)), t)

    return Readout(r.metric, local(r.answer), local(r.wrong), local(r.candidates), r.records, r.keep, vocab)


def restrict_unembed(model, r: Readout) -> None:
    """With ``r.vocab``, the unembedding's output replaced by the logits of those ids alone."""
    if r.vocab is not None:
        h = model.final_norm.output[:, -kept(r):]
        w = model.unembed.weight
        logits = h @ w[r.vocab.to(w.device)].T
        b = model.unembed.bias
        model.unembed.skip(logits if b is None else logits + b[r.vocab.to(b.device)])


def kept(r: Readout) -> int:
    """How many last positions' logits the readout reads (``logits_to_keep`` of the trace)."""
    if r.keep is not None:
        return r.keep
    return r.answer.shape[0] if r.metric == ANSWER_PROB else kept_logits(r.metric, r.answer)


def read(logits: torch.Tensor, r: Readout) -> tuple:
    """(metric per row, the answer ids scored): ANSWER_PROB resolves ``[-1]`` to the first row's top-1;
    LOGITS gives the last position's candidate logits [rows, k]."""
    if r.metric == ANSWER_PROB:
        return sequence_prob(logits, r.answer)
    if r.metric == LOGITS:
        return logits[:, -1][:, r.candidates].float(), r.answer
    return score(r.metric, logits, r.answer, r.wrong, r.candidates), r.answer


def rows_readout(r: Readout, answer: torch.Tensor, rows: torch.Tensor) -> Readout:
    """The readout of a suffix run's rows: per-row answers follow their reference rows; a single answer
    (``answer`` resolved by the reference run) is shared."""
    if answer.dim() == 1:
        return Readout(r.metric, answer, r.wrong, r.candidates, r.records, r.keep, r.vocab)
    return Readout(r.metric, answer[rows], None if r.wrong is None else r.wrong[rows], r.candidates, r.records, r.keep,
                   r.vocab)


# --------------------------------------------------------------------------------------------------
# traces
# --------------------------------------------------------------------------------------------------
def trace_forward(model, fwd: Forward) -> tuple:
    """One ``Forward``: noise, skipped layers, writes; (metric per row, answer ids), plus the recorded
    activations (a list in ``readout.records`` order) when the readout has records."""
    kw = {"past_key_values": fwd.cache, "use_cache": True} if fwd.cache is not None else {}
    with model.trace(fwd.inputs, logits_to_keep=kept(fwd.readout), **kw):
        apply_noise(model, fwd.noise)
        for layer in range(fwd.l0):
            model.layers[layer].skip(fwd.start)
        acts = list().save() if fwd.readout.records else None
        apply_writes(model, fwd.writes, fwd.n_heads, fwd.readout.records, acts)
        restrict_unembed(model, fwd.readout)
        values, answer = read(model.output.logits, fwd.readout)
        values = values.detach().cpu().save()
        answer = answer.detach().cpu().save()
    return (values, answer, acts) if fwd.readout.records else (values, answer)


def trace_reference(model, ref: Reference, n_layers: int, n_heads: int, keep: bool) -> Recorded:
    """One reference run (``Recorded``). ``keep`` saves everything (local runs); inside a session values
    flow without saving."""
    with model.trace(ref.inputs, use_cache=ref.cache, logits_to_keep=kept(ref.readout)):
        apply_noise(model, ref.noise)
        acts = list().save() if keep else list()
        kv = list().save() if keep else list()
        for name, layer in ref.records:
            acts.append(patch_site(model, name, layer, n_heads).detach().clone())
        restrict_unembed(model, ref.readout)
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
    at = w.pos if w.src_pos is None else w.src_pos
    value = rec[w.src, at + p0] if w.pos is not None else rec[w.src, p0:]
    return Write(w.site, w.layer, w.rows, w.pos, w.mask, None, None, value, None, None, w.basis)


def run_chunk(model, sweep: Sweep, base: Recorded, source: Recorded, job: Suffix) -> torch.Tensor:
    """One suffix run (``Suffix``) on the base run's cache and starting states, its writes filled from
    the source run's records; the metric per row."""
    ref, rows, p0, l0 = sweep.base, job.rows, job.p0, job.l0
    mask = ref.inputs["attention_mask"]
    inputs = {"input_ids": ref.inputs["input_ids"][rows, p0:], "attention_mask": mask[rows],
              "position_ids": positions(mask)[rows, p0:]}
    cache = prefix_cache(None, base.kv, p0, rows, l0) if job.cache else None
    start = base.acts[job.start][rows, p0:].clone() if l0 > 0 else None
    writes = list()
    for w in job.writes:
        w = fill_write(w, source.acts, p0)
        if w.layer < l0:
            apply_write(start, w)
        else:
            writes.append(w)
    noise = Noise(ref.noise.bank[:, p0:], ref.noise.rows[rows]) if ref.noise is not None and l0 == 0 else None
    readout = rows_readout(ref.readout, base.answer, rows)
    keep, last = kept(readout), sweep.n_layers - 1
    if l0 <= last and not readout.records and 0 < keep < inputs["input_ids"].shape[1]:
        writes = sorted(writes + [MlpTail(last, keep)], key=lambda w: order_key(w.site, w.layer))
    return trace_suffix(model, Forward(inputs, readout, writes, noise, sweep.n_heads, l0, start, cache))


def trace_references(model, sweep: Sweep, keep: bool) -> tuple[Recorded, Recorded]:
    """The sweep's base and source runs (the base run's records fill the writes when it has no source)."""
    base = trace_reference(model, sweep.base, sweep.n_layers, sweep.n_heads, keep)
    if sweep.source is None:
        return base, base
    return base, trace_reference(model, sweep.source, sweep.n_layers, sweep.n_heads, keep)


def trace_sweep(model, sweep: Sweep) -> tuple:
    """Every forward of a sweep inside one session: (base metric, base answer ids, source metric or
    None, per-chunk metrics)."""
    base, source = trace_references(model, sweep, False)
    outs = list()
    for job in sweep.chunks:
        outs.append(run_chunk(model, sweep, base, source, job))
    return base.values, base.answer, None if sweep.source is None else source.values, outs
