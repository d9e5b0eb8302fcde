"""Planning a sweep: which patched rows run at all, and on how little of the model.

A sweep patches, for every pair and every cell (a layer and a position or head), the base run with the
source run's activation over the cell's region. Three facts make most of that work unnecessary:

1. Before the first token where base and source differ, their activations are identical (causal
   attention), so a substitution there writes what is already there: such writes are dropped, and a
   cell with nothing left is *skipped*: its value is the base run's metric, exactly.
2. The metric reads the last position only. At the last layer a write to ``resid_post``, ``attn_out``,
   ``mlp_out`` or ``head_out`` (and ``unembed_in`` anywhere) away from the last position reaches nothing.
3. A write at (layer l, position p) cannot change anything below l or before p: a chunk whose rows start
   at (l0, p0) runs tokens p0.. on top of the base run's key/value cache, with layers < l0 skipped.

``plan_sweep`` groups rows by (start layer, start position) into chunks of at most ``max_rows`` rows and
returns ``Chunk`` records; the runner (``interpkit.engine.run``) executes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

LAST_LAYER_LOCAL = ("resid_post", "attn_out", "mlp_out", "head_out")
"""Sites whose write at the last layer stays at its own position."""


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
    layer_blocks: int = 3          # rows are split into this many start-layer groups ...
    position_blocks: int = 3       # ... times this many start-position groups, so small sweeps skip work too

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
    layer_index: int               # index into the swept layers (which source activation)
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


def effective_masks(spec: SweepSpec, li: int) -> torch.Tensor:
    """[pairs, cells, T(, H)] bool: the writes of every (pair, cell) at swept layer ``li`` that can matter."""
    T = spec.T
    pos = torch.arange(T)
    keep = torch.ones(spec.n_pairs, T, dtype=torch.bool)
    if spec.substitution:
        keep &= pos[None] >= spec.first_diff[:, None]
    layer = spec.layers[li]
    if layer >= spec.n_layers or (layer == spec.n_layers - 1 and spec.site in LAST_LAYER_LOCAL):
        keep &= pos[None] == T - 1
    m = spec.cell_masks[None]                                   # [1, cells, T(, H)]
    k = keep[:, None]                                           # [pairs, 1, T]
    return m & (k[..., None] if m.dim() == 4 else k)


def plan_sweep(spec: SweepSpec) -> Plan:
    """Chunks of at most ``max_rows`` rows, grouped by start layer then start position (module doc)."""
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
    chunks = []
    for by_layer in _groups(rows, 0, spec.layer_blocks):
        for group in _groups(by_layer, 1, spec.position_blocks):
            group.sort(key=lambda r: (r[0], r[1]))
            for i in range(0, len(group), spec.max_rows):
                chunks.append(_chunk(len(chunks), group[i:i + spec.max_rows], spec))
    full = P * len(spec.layers) * n_cells * T * spec.n_layers
    done = sum(c.n_rows * (T - c.p0) * max(spec.n_layers - c.l0, 1) for c in chunks)
    return Plan(chunks=chunks, skipped=skipped, work=done / max(full, 1))


def _groups(rows: list, key: int, blocks: int) -> list[list]:
    """Rows split into at most ``blocks`` groups of contiguous values of ``r[key]`` (start layer or
    position), so that every chunk starts close to where its rows start."""
    values = sorted({r[key] for r in rows})
    if not values:
        return []
    per = -(-len(values) // max(1, min(blocks, len(values))))
    cut = {v: i // per for i, v in enumerate(values)}
    groups: dict[int, list] = {}
    for r in rows:
        groups.setdefault(cut[r[key]], []).append(r)
    return [groups[k] for k in sorted(groups)]


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
        chunk.writes.append(LayerWrite(layer=spec.layers[li], layer_index=li, rows=torch.tensor(idx),
                                       pairs=torch.tensor([rows[i][4] for i in idx]), mask=mask))
    return chunk
