"""Planning a sweep: which patched rows run at all, and on how little of the model.

A sweep patches, for every pair and every cell (a layer and a position or head), the base run with the
source run's activation over the cell's region. Three facts make most of that work unnecessary:

1. Before the first token where base and source differ, their activations are identical (causal
   attention), so a substitution there writes what is already there: such writes are dropped, and a
   cell with nothing left is *skipped*: its value is the base run's metric, exactly. The same holds
   for ``resid_pre`` of layer 0 at a later position holding the same token (it is that token's
   embedding).
2. The metric reads the logits of the last position (of the last few, for multi-token answers). At the
   last layer a write to ``resid_post``, ``attn_out``, ``mlp_out`` or ``head_out`` (and ``unembed_in``
   anywhere) away from those positions reaches nothing.
3. A write at (layer l, position p) cannot change anything below l or before p: a chunk whose rows start
   at (l0, p0) runs tokens p0.. on top of the base run's key/value cache, with layers < l0 skipped.

``plan_sweep`` groups rows by (start layer, start position) into chunks of at most ``max_rows`` rows and
returns ``Chunk`` records; the runner (``interpkit.engine.run``) executes them. The grouping
(``group_by_start``, shared with causal tracing's planner) is the one with the least estimated cost
(``ForwardCost``): merging rows that start at different places computes more token-layers but saves
the fixed cost of a forward and of each layer it runs, which dominates for small groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interpkit.kv_cache import positions

LAST_LAYER_LOCAL = ("resid_post", "attn_out", "mlp_out", "head_out")
"""Sites whose write at the last layer stays at its own position."""


FLOPS = 5e10                       # float32 multiply-adds x 2 per second, one CPU core (measured ~4.9e10)
LAYER_S = 2.5e-3                   # seconds of module calls per layer a forward runs, whatever its batch
BANDWIDTH = 1.5e10                 # bytes/s: every forward reads each layer's weights once
FORWARD_S = 0.02                   # seconds per forward (trace set-up, embedding, final norm, readout)
MAX_SPAN = 16                      # start positions one forward may cover


@dataclass(frozen=True)
class ForwardCost:
    """The fixed costs of a forward in token-layers (one token through one layer: the unit of
    ``Plan.work``): one per forward and one per layer it runs. Calibrated on one CPU core
    (smollm2-135m: 23 ms per forward, 4.1 ms per layer, 0.14 ms per token-layer, measured); on a
    GPU the fixed parts weigh more, so the same plan only errs towards too many forwards."""

    per_forward: float = 150.0
    per_layer: float = 25.0

    @classmethod
    def for_layer(cls, params: int) -> ForwardCost:
        """The costs for a model whose layers have ``params`` parameters each."""
        token_layer = 2 * params / FLOPS
        per_layer = LAYER_S + 4 * params / BANDWIDTH
        return cls(FORWARD_S / token_layer, per_layer / token_layer)

    @classmethod
    def for_model(cls, arch) -> ForwardCost:
        """The costs for a model (an ``interpkit.arch.Arch``), from the size of its first layer."""
        return cls.for_layer(sum(p.numel() for p in arch.block(0).parameters()))

    def of(self, rows: int, tokens: int, layers: int, forwards: int = 1) -> float:
        return forwards * (self.per_forward + layers * self.per_layer) + rows * tokens * layers


def group_by_start(items: list[tuple[int, int, int]], n_tokens: int, n_layers: int, max_rows: int,
                   cost: ForwardCost) -> list[tuple[int, int, list[int]]]:
    """Items (start position, start layer, rows) grouped into forwards ``(p0, l0, item indices)`` of at
    most ``max_rows`` rows (an item larger than that runs alone), each computing tokens p0.. through
    layers l0.. for all its rows: the grouping of least ``cost`` among those that merge contiguous
    start positions (at most ``MAX_SPAN``) and, within them, contiguous start layers (dynamic
    programming on both; only the chosen grouping is built)."""
    by_start: dict[tuple[int, int], list[int]] = {}
    for i, (p, l, _) in enumerate(items):
        by_start.setdefault((p, l), []).append(i)
    starts = sorted({p for p, _ in by_start})
    best: list[tuple[float, int, dict]] = [(0.0, -1, {})] + [(float("inf"), -1, {})] * len(starts)
    for j in range(len(starts)):
        for i in range(max(0, j - MAX_SPAN + 1), j + 1):
            members: dict[int, list[int]] = {}
            for (p, l), idx in by_start.items():
                if starts[i] <= p <= starts[j]:
                    members.setdefault(l, []).extend(idx)
            c = best[i][0] + _layer_cost(members, items, n_tokens - starts[i], n_layers, max_rows, cost)[0]
            if c < best[j + 1][0]:
                best[j + 1] = (c, i, members)
    out, j = [], len(starts)
    while j > 0:
        _, i, members = best[j]
        out = _layer_groups(members, items, n_tokens - starts[i], n_layers, max_rows, cost) + out
        j = i
    return [(min(items[i][0] for i in idx), min(items[i][1] for i in idx), idx) for idx in out]


def _layer_cost(members: dict[int, list[int]], items, tokens: int, n_layers: int, max_rows: int,
                cost: ForwardCost) -> tuple[float, list[tuple[int, int]]]:
    """(least cost, back-pointers) of grouping ``members`` (start layer -> items), ``tokens`` tokens each,
    into contiguous ranges of start layers; only a single start layer may exceed ``max_rows`` (split)."""
    layers = sorted(members)
    weight = [sum(items[i][2] for i in members[l]) for l in layers]
    best: list[tuple[float, int]] = [(0.0, -1)] + [(float("inf"), -1)] * len(layers)
    for b in range(len(layers)):
        n = 0
        for a in range(b, -1, -1):
            n += weight[a]
            if n > max_rows and a < b:
                break
            forwards = len(_split(members[layers[a]], items, max_rows)) if a == b else 1
            c = best[a][0] + cost.of(n, tokens, max(n_layers - layers[a], 1), forwards)
            if c < best[b + 1][0]:
                best[b + 1] = (c, a)
    return best[-1][0], best


def _layer_groups(members: dict[int, list[int]], items, tokens: int, n_layers: int, max_rows: int,
                  cost: ForwardCost) -> list[list[int]]:
    """The forwards (their items) of ``_layer_cost``'s grouping."""
    layers = sorted(members)
    best = _layer_cost(members, items, tokens, n_layers, max_rows, cost)[1]
    groups, b = [], len(layers)
    while b > 0:
        a = best[b][1]
        groups = _split([i for l in layers[a:b] for i in members[l]], items, max_rows) + groups
        b = a
    return groups


def _split(rows: list[int], items, max_rows: int) -> list[list[int]]:
    """Consecutive pieces of at most ``max_rows`` rows (an item larger than that alone), as even as the
    items allow (576 rows at 512 a forward: 288 + 288, not 512 + 64)."""
    weights = [items[i][2] for i in rows]
    total = sum(weights)
    size = min(max_rows, -(-total // max(1, -(-total // max_rows))) + max(weights, default=1) - 1)
    pieces, n = [[]], 0
    for i in rows:
        w = items[i][2]
        if pieces[-1] and n + w > size:
            pieces.append([])
            n = 0
        pieces[-1].append(i)
        n += w
    return pieces


@dataclass(frozen=True)
class SweepSpec:
    """What the planner needs: the grid, the cells' regions and where base and source first differ."""

    site: str
    layers: list[int]              # swept layers (``n_layers`` stands for unembed_in)
    n_layers: int
    cell_masks: torch.Tensor       # [cells, T] or [cells, T, H] bool: where each cell writes
    first_diff: torch.Tensor       # [pairs] first position where base and source differ (T: none)
    substitution: bool = True      # deletion writes zeros: nothing is a no-op
    max_rows: int = 512
    n_read: int = 1                # last positions whose logits the metric reads
    cost: ForwardCost = field(default_factory=ForwardCost)   # how rows are grouped into forwards
    same_embedding: torch.Tensor | None = None   # [pairs, T] bool: base and source embed a position alike

    @property
    def n_pairs(self) -> int:
        return int(self.first_diff.shape[0])

    @property
    def T(self) -> int:
        return int(self.cell_masks.shape[1])


@dataclass
class LayerWrite:
    """The rows of a chunk written at one layer: row ``rows[i]`` takes pair ``pairs[i]``'s source
    activation where ``mask[i]`` is set (positions counted from the chunk's first position)."""

    layer: int
    rows: torch.Tensor             # [n] rows of the chunk
    pairs: torch.Tensor            # [n] pair of each row (its base and source run)
    mask: torch.Tensor             # [n, T - p0, 1] or [n, T - p0, H, 1] bool


@dataclass
class Chunk:
    """One forward: rows that all start at layer >= l0 and position >= p0."""

    index: int
    l0: int
    p0: int
    pairs: torch.Tensor            # [n] base run (pair) of each row
    cells: torch.Tensor            # [n, 2] (layer index, cell index) of each row
    writes: list[LayerWrite] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return int(self.pairs.shape[0])


@dataclass
class Plan:
    chunks: list[Chunk]
    skipped: torch.Tensor          # [pairs, layers, cells] bool: provably equal to the base run
    work: float                    # token-layers computed / those of one full forward per patched row

    @property
    def starts(self) -> list[int]:
        """Layers at which some chunk starts (the base residual stream is kept there)."""
        return sorted({c.l0 for c in self.chunks})


def first_difference(base_ids: torch.Tensor, source_ids: torch.Tensor, base_mask: torch.Tensor,
                     source_mask: torch.Tensor) -> torch.Tensor:
    """Per pair, the first position where the two runs' tokens or attention masks differ (T if none)."""
    differ = (base_ids != source_ids) | (base_mask != source_mask)
    T = differ.shape[1]
    idx = torch.arange(T).expand_as(differ)
    return torch.where(differ, idx, torch.full_like(idx, T)).min(1).values


def same_embedding(base: dict, source: dict) -> torch.Tensor:
    """[pairs, T] bool: positions where both runs hold the same real token at the same position id, so
    their embeddings (``resid_pre`` of layer 0) are equal."""
    bm, sm = base["attention_mask"].bool(), source["attention_mask"].bool()
    return ((base["input_ids"] == source["input_ids"]) & bm & sm
            & (positions(base["attention_mask"]) == positions(source["attention_mask"])))


def reaches_readout(first: torch.Tensor, layer: int, site: str, n_layers: int, n_tokens: int, n_read: int = 1,
                    substitution: bool = True) -> torch.Tensor:
    """[n, T] bool: where a write at (``site``, ``layer``) can change what the readout reads, for runs
    whose tokens first differ at ``first`` [n]: nowhere before ``first`` (a substitution there writes
    what is already there, facts 1), and at the last layer, for a site that stays at its own position
    (``unembed_in`` anywhere), only at the ``n_read`` last positions, whose logits are read (fact 2).
    Patching's and causal tracing's planners both ask this."""
    pos = torch.arange(n_tokens)
    keep = torch.ones(first.shape[0], n_tokens, dtype=torch.bool)
    if substitution:
        keep &= pos[None] >= first[:, None]
    if layer >= n_layers or (layer == n_layers - 1 and site in LAST_LAYER_LOCAL):
        keep &= pos[None] >= n_tokens - n_read
    return keep


def effective_masks(spec: SweepSpec, li: int) -> torch.Tensor:
    """[pairs, cells, T(, H)] bool: the writes of every (pair, cell) at swept layer ``li`` that can matter."""
    layer = spec.layers[li]
    keep = reaches_readout(spec.first_diff, layer, spec.site, spec.n_layers, spec.T, spec.n_read, spec.substitution)
    if spec.substitution and layer == 0 and spec.site == "resid_pre" and spec.same_embedding is not None:
        keep &= ~spec.same_embedding                # the embedding of the same token at the same position
    m = spec.cell_masks[None]                                   # [1, cells, T(, H)]
    k = keep[:, None]                                           # [pairs, 1, T]
    return m & (k[..., None] if m.dim() == 4 else k)


def plan_sweep(spec: SweepSpec) -> Plan:
    """Chunks of at most ``max_rows`` rows, grouped by start layer and position (``group_by_start``)."""
    P, T = spec.n_pairs, spec.T
    n_cells = spec.cell_masks.shape[0]
    skipped = torch.zeros(P, len(spec.layers), n_cells, dtype=torch.bool)
    rows = []                                                   # (layer, start, li, ci, pair, mask)
    for li, layer in enumerate(spec.layers):
        eff = effective_masks(spec, li)
        anypos = eff.flatten(3).any(-1) if eff.dim() == 4 else eff   # [pairs, cells, T]
        live = anypos.any(-1)
        skipped[:, li] = ~live
        start = torch.where(anypos, torch.arange(T), torch.full_like(anypos, T, dtype=torch.long)).min(-1).values
        for p, c in live.nonzero().tolist():
            rows.append((min(layer, spec.n_layers), int(start[p, c]), li, c, p, eff[p, c]))
    groups = group_by_start([(r[1], r[0], 1) for r in rows], T, spec.n_layers, spec.max_rows, spec.cost)
    chunks = [_chunk(k, sorted((rows[i] for i in idx), key=lambda r: (r[0], r[1])), spec)
              for k, (_, _, idx) in enumerate(groups)]
    full = P * len(spec.layers) * n_cells * T * spec.n_layers
    done = sum(c.n_rows * (T - c.p0) * max(spec.n_layers - c.l0, 1) for c in chunks)
    return Plan(chunks=chunks, skipped=skipped, work=done / max(full, 1))


def _chunk(index: int, rows: list, spec: SweepSpec) -> Chunk:
    l0, p0 = min(r[0] for r in rows), min(r[1] for r in rows)
    chunk = Chunk(index=index, l0=l0, p0=p0, pairs=torch.tensor([r[4] for r in rows]),
                  cells=torch.tensor([[r[2], r[3]] for r in rows]))
    by_layer: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_layer.setdefault(r[2], []).append(i)
    for li in sorted(by_layer):
        idx = by_layer[li]
        mask = torch.stack([rows[i][5][p0:] for i in idx])[..., None]
        chunk.writes.append(LayerWrite(layer=spec.layers[li], rows=torch.tensor(idx),
                                       pairs=torch.tensor([rows[i][4] for i in idx]), mask=mask))
    return chunk
