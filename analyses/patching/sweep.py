"""Activation patching: a whole (layer x position) or (layer x head) sweep, planned on the sweep engine.

Every patched run is one row of a batch: the base run with the source run's activation written over one
cell's region at one layer. ``interpkit.engine`` plans the sweep: cells that provably change nothing
(before the first token where the two runs differ, or at the last layer away from the last token) are
skipped and stored as the base run's metric (``PatchResult.skipped`` marks them); the rest run from
their first written position and layer on, on the base run's key/value cache, with the base and source
runs computed once per sweep. Remotely the whole sweep is one NDIF request (a session).
``engine="full"`` keeps the plain reference: whole prompts, every layer, the source and base rows
recomputed in every chunk.

Directions: ``denoise`` writes clean activations into the corrupted run (base = corrupted), ``noise``
writes corrupted activations into the clean run (base = clean). The normalised metric is 0 at the base
run and 1 at the source run (``PatchResult.clean_normalized`` is 1 at clean and 0 at corrupted in either
direction). ``deletion`` zeroes the region instead (seed 000's deletion mode).

Besides the sites of ``interpkit.sites``, ``unembed_in`` is the final normalised residual that the
unembedding reads (one "layer", labelled n_layers): the metric is linear in it for logit differences,
so attribution patching (``analyses.patching.attribution``) is exact there. Only the last position's logits are
computed (``logits_to_keep=1``): every metric reads them alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from interpkit.engine.inside import UNEMBED_IN, Forward, Readout, Write, patch_site
from interpkit.engine.plan import ForwardCost, LayerWrite, Plan, SweepSpec, first_difference, plan_sweep, same_embedding
from interpkit.engine.run import SweepRuns, run_forwards, run_plan, run_session
from interpkit.errors import UserError
from interpkit.metrics import SEQ_LOGPROB, kept_logits, normalize
from interpkit.sites import SITES
from interpkit.tasks.base import append_tokens

REGIONS = ("position", "prefix", "suffix", "window")
ENGINES = ("prefix", "full")
PATCH_SITES = SITES + (UNEMBED_IN,)
__all__ = ["PatchConfig", "PatchResult", "run_patching", "region_mask", "patch_site", "run_session", "sweep_inputs"]


@dataclass
class PatchConfig:
    """What to patch and how; every field is a CLI option."""

    site: str = "resid_post"
    by: str = "position"            # "position": layer x position cells; "head": layer x head cells
    region: str = "position"        # position | prefix (0..t) | suffix (t..end) | window (t..t+window-1)
    window: int = 1
    mode: str = "substitution"      # substitution | deletion
    direction: str = "denoise"      # denoise | noise
    metric: str = "logit_diff"      # logit_diff | prob_diff | margin (needs candidates)
    layers: list[int] | None = None
    positions: list[int] | None = None
    max_rows: int = 512             # rows per forward (memory knob)
    engine: str = "prefix"          # prefix: skip what cannot change (default) | full: plain reference

    def validate(self, n_layers: int) -> None:
        checks = [(self.site in PATCH_SITES, f"site {self.site!r}; use one of {', '.join(PATCH_SITES)}"),
                  (self.by in ("position", "head"), f"--by {self.by!r}; use position or head"),
                  (self.by != "head" or self.site == "head_out", "--by head needs --site head"),
                  (self.region in REGIONS, f"region {self.region!r}; use one of {', '.join(REGIONS)}"),
                  (self.mode in ("substitution", "deletion"), f"mode {self.mode!r}; use substitution or deletion"),
                  (self.direction in ("denoise", "noise"), f"direction {self.direction!r}; use denoise or noise"),
                  (self.metric in ("logit_diff", "prob_diff", "margin"), f"metric {self.metric!r}"),
                  (self.engine in ENGINES, f"engine {self.engine!r}; use prefix or full"),
                  (self.window >= 1, "window must be >= 1"),
                  (self.max_rows >= 1, "max_rows must be >= 1"),
                  (self.site != UNEMBED_IN or self.layers is None,
                   "--site unembed_in has a single layer (after the last); leave --layers out")]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"bad patch option: {msg}")
        for layer in self.layers or []:
            if not 0 <= layer < n_layers:
                raise UserError(f"layer {layer} is out of range; this model has layers 0..{n_layers - 1}")

    def sweep_layers(self, n_layers: int) -> list[int]:
        """The layers the sweep covers (``unembed_in`` sits after the last layer: labelled n_layers)."""
        if self.site == UNEMBED_IN:
            return [n_layers]
        return list(self.layers) if self.layers is not None else list(range(n_layers))


@dataclass
class PatchResult:
    """Per-pair metric of every patched run, labelled by layer and by position (or head)."""

    config: PatchConfig
    layers: list[int]
    cells: list[int]                # positions (by="position") or heads (by="head")
    values: torch.Tensor            # [pairs, layers, cells] raw metric of the patched runs
    base: torch.Tensor              # [pairs] metric of the unpatched base run
    source: torch.Tensor            # [pairs] metric of the source run (0 for deletion)
    timings: dict = field(default_factory=dict)
    method: str = "exact"           # "exact" (patched forwards) or "attribution" (first-order estimate)
    skipped: torch.Tensor | None = None   # [pairs, layers, cells]: provably the base run, not computed
    normalize: str = "pair"         # "pair": each pair by its own gap | "mean": the batch-mean metric
    min_gap: float = 0.0            # pairs with |source - base| < min_gap x the median gap are excluded

    @property
    def excluded(self) -> torch.Tensor:
        """[pairs] bool: pairs whose base and source barely differ (their normalised effect is noise)."""
        gap = (self.source - self.base).abs()
        return gap < self.min_gap * gap.median() if self.min_gap > 0 else torch.zeros_like(gap, dtype=torch.bool)

    @property
    def normalized(self) -> torch.Tensor:
        """Per pair: 0 at the base run, 1 at the source run (NaN for excluded pairs)."""
        v = normalize(self.values, self.base[:, None, None], self.source[:, None, None])
        return v.masked_fill(self.excluded[:, None, None], float("nan"))

    @property
    def clean_normalized(self) -> torch.Tensor:
        """Per pair: 1 at the clean run, 0 at the corrupted run, whichever way the patch went."""
        clean, corrupt = (self.source, self.base) if self.config.direction == "denoise" else (self.base, self.source)
        v = normalize(self.values, corrupt[:, None, None], clean[:, None, None])
        return v.masked_fill(self.excluded[:, None, None], float("nan"))

    def effect(self, clip: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Mean normalised effect [layers, cells] over all pairs or the selected rows, excluded pairs left
        out: the mean of per-pair effects (``normalize="pair"``) or the effect of the mean metric ("mean")."""
        keep = ~self.excluded
        if rows is not None:
            chosen = torch.zeros_like(keep)
            chosen[rows] = True
            keep &= chosen
        if self.normalize == "mean":
            v = normalize(self.values[keep].mean(0), self.base[keep].mean(), self.source[keep].mean())
        else:
            v = self.normalized[keep]
            v = v.clamp(0, 1) if clip else v
            return v.nanmean(0)
        return v.clamp(0, 1) if clip else v

    def to_dataframe(self):
        import pandas as pd

        eff, clipped, clean = self.effect(), self.effect(clip=True), self.clean_normalized.nanmean(0)
        skipped = self.skipped.all(0) if self.skipped is not None else torch.zeros_like(eff, dtype=torch.bool)
        return pd.DataFrame([{"layer": l, self.config.by: c, "effect": float(eff[i, j]),
                              "effect_clipped": float(clipped[i, j]), "clean_normalized": float(clean[i, j]),
                              "skipped": bool(skipped[i, j]), "method": self.method}
                             for i, l in enumerate(self.layers) for j, c in enumerate(self.cells)])


def region_mask(cfg: PatchConfig, cell: int, T: int) -> torch.Tensor:
    """[T] bool: the positions a (by="position") cell writes; every position for head cells."""
    pos = torch.arange(T)
    if cfg.by == "head":
        return torch.ones(T, dtype=torch.bool)
    if cfg.region == "position":
        return pos == cell
    if cfg.region == "prefix":
        return pos <= cell
    if cfg.region == "suffix":
        return pos >= cell
    return (pos >= cell) & (pos < cell + cfg.window)


def cell_masks(cfg: PatchConfig, cells: list[int], T: int, n_heads: int) -> torch.Tensor:
    """[cells, T] (layer sites) or [cells, T, H] (head_out) bool: where each cell writes."""
    masks = torch.stack([region_mask(cfg, c, T) for c in cells])
    if cfg.by == "head":
        return masks[:, :, None] & (torch.arange(n_heads)[None, None] == torch.tensor(cells)[:, None, None])
    if cfg.site == "head_out":
        return masks[:, :, None]                                # every head at the cell's positions
    return masks


@dataclass
class SweepInputs:
    """What a sweep runs on: base and source batches, the swept layers and cells, the answers and metric.

    With multi-token answers (your own data) every pair becomes two rows, prompt + answer and prompt +
    wrong answer (or one row without wrong answers), scored by summed teacher-forced log-probability;
    ``fold`` turns per-row metrics back into per-pair ones (answer minus wrong answer)."""

    base: dict
    source: dict
    layers: list[int]
    cells: list[int]
    answer: torch.Tensor
    wrong: torch.Tensor
    metric: str
    pairs: int
    stacked: bool = False           # rows are [answer rows; wrong-answer rows]

    def fold(self, t: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [pairs, ...]: answer rows minus wrong-answer rows (bool masks: both rows)."""
        if not self.stacked:
            return t
        a, w = t[:self.pairs], t[self.pairs:]
        return a & w if t.dtype == torch.bool else a - w


def sweep_inputs(lm, prompts, cfg: PatchConfig, candidates: torch.Tensor | None = None) -> SweepInputs:
    """The validated inputs of a sweep; shared with attribution patching."""
    arch = lm.arch
    cfg.validate(arch.n_layers)
    if cfg.metric == "margin" and candidates is None:
        raise UserError("the margin metric needs candidate answer tokens; use --metric logit_diff")
    clean, corrupt = prompts.batch(), prompts.batch(corrupted=True)
    if clean["input_ids"].shape != corrupt["input_ids"].shape:
        raise UserError("clean and corrupted prompts differ in token length; patching needs aligned pairs")
    base, source = (corrupt, clean) if cfg.direction == "denoise" else (clean, corrupt)
    T = clean["input_ids"].shape[1]
    for p in cfg.positions or []:
        if not 0 <= p < T:
            raise UserError(f"position {p} is out of range; these prompts have positions 0..{T - 1}")
    layers = cfg.sweep_layers(arch.n_layers)
    cells = list(range(arch.n_heads)) if cfg.by == "head" else (cfg.positions if cfg.positions is not None else list(range(T)))
    answer = prompts.answer_ids
    wrong = prompts.wrong_ids if prompts.wrong_ids is not None else torch.full_like(answer, -1)
    if not prompts.multi_token:
        return SweepInputs(base, source, layers, cells, answer, wrong, cfg.metric, len(prompts))
    if cfg.metric != "logit_diff":
        raise UserError(f"multi-token answers are scored by summed log-probability; --metric {cfg.metric} "
                        f"reads one token, use --metric logit_diff")
    seqs = prompts.sequences("answer")
    stacked = prompts.wrong_ids is not None
    if stacked:
        seqs = seqs + prompts.sequences("wrong")
    batches = []
    for b in (base, source):
        both = {k: torch.cat([v, v]) if stacked else v for k, v in b.items()}
        batches.append(append_tokens(both, seqs))
    (base, answer), (source, _) = batches
    return SweepInputs(base, source, layers, cells, answer, torch.full_like(answer, -1), SEQ_LOGPROB,
                       len(prompts), stacked)


@dataclass
class PlannedSweep:
    """A patching sweep planned on the engine: what ``execute`` runs."""

    plan: Plan
    runs: SweepRuns
    layers: list[int]
    cells: list[int]
    inputs: SweepInputs


def plan_patching(lm, prompts, cfg: PatchConfig, candidates: torch.Tensor | None = None) -> PlannedSweep:
    """``cfg``'s sweep as engine chunks, with the provably-zero cells marked skipped."""
    inp = sweep_inputs(lm, prompts, cfg, candidates)
    base, source, layers, cells = inp.base, inp.source, inp.layers, inp.cells
    T = base["input_ids"].shape[1]
    spec = SweepSpec(site=cfg.site, layers=layers, n_layers=lm.arch.n_layers,
                     cell_masks=cell_masks(cfg, cells, T, lm.arch.n_heads),
                     first_diff=first_difference(base["input_ids"], source["input_ids"], base["attention_mask"],
                                                 source["attention_mask"]),
                     substitution=cfg.mode == "substitution", max_rows=cfg.max_rows,
                     n_read=kept_logits(inp.metric, inp.answer),
                     cost=ForwardCost.for_model(lm.arch), same_embedding=same_embedding(base, source))
    runs = SweepRuns(base=base, source=source, site=cfg.site, n_heads=lm.arch.n_heads, n_layers=lm.arch.n_layers,
                     metric=inp.metric, answer=inp.answer, wrong=inp.wrong, candidates=candidates,
                     deletion=cfg.mode == "deletion")
    return PlannedSweep(plan=plan_sweep(spec), runs=runs, layers=layers, cells=cells, inputs=inp)


def execute(lm, cfg: PatchConfig, sweep: PlannedSweep, on_chunk=None, done: dict | None = None,
            progress=None) -> PatchResult:
    """Run a planned sweep (locally chunk by chunk, remotely as one request) into a ``PatchResult``."""
    t0 = time.perf_counter()
    out = run_plan(lm.model, sweep.plan, sweep.layers, sweep.runs, remote=lm.remote, done=done,
                   on_chunk=on_chunk, progress=progress)
    fold = sweep.inputs.fold
    base_v = fold(out.base)
    source_v = torch.zeros_like(base_v) if cfg.mode == "deletion" else fold(out.source)
    plan = sweep.plan
    return PatchResult(config=cfg, layers=sweep.layers, cells=sweep.cells, values=fold(out.values), base=base_v,
                       source=source_v, skipped=fold(plan.skipped),
                       timings={"sweep_s": time.perf_counter() - t0, "forwards": 2 + len(plan.chunks),
                                "work": plan.work, "skipped": float(plan.skipped.float().mean()),
                                "requests": out.requests, "reused_chunks": len(done or {})})


def run_patching(lm, prompts, cfg: PatchConfig, candidates: torch.Tensor | None = None,
                 on_chunk=None, done: dict | None = None, progress=None) -> PatchResult:
    """Sweep ``cfg`` over the pairs of ``prompts`` (a PromptSet with corrupted counterparts).

    ``on_chunk(i, values)`` is called as each chunk finishes (the CLI stores chunks as they finish);
    ``done`` maps chunk index -> values already computed (a resumed run), and those chunks are not rerun;
    ``progress`` (an ``interpkit.progress.Stage``) advances once per chunk.
    """
    if cfg.engine == "full":
        return run_full_patching(lm, prompts, cfg, candidates, on_chunk, done)
    return execute(lm, cfg, plan_patching(lm, prompts, cfg, candidates), on_chunk, done, progress)


# -- the reference engine: whole prompts, every layer, source and base rows in every chunk -------------
@dataclass
class FullChunk:
    """One forward of the plain engine: the source and base rows, then one base row per (pair, cell) of
    ``cells`` ((layer index, cell index) each); ``writes`` say which rows take which pair's source rows."""

    cells: list[tuple[int, int]]
    writes: list[LayerWrite]


def plan_chunks(cfg: PatchConfig, n_pairs: int, layers: list[int], cells: list[int], T: int,
                n_heads: int) -> list[FullChunk]:
    """The (layer, cell) grid in chunks of at most ``max_rows`` rows (the source and base rows included)."""
    masks = cell_masks(cfg, cells, T, n_heads)
    grid = [(li, ci) for li in range(len(layers)) for ci in range(len(cells))]
    per_chunk = max(1, (cfg.max_rows - 2 * n_pairs) // n_pairs)
    chunks = []
    for start in range(0, len(grid), per_chunk):
        part = grid[start:start + per_chunk]
        writes = []
        for li, layer in enumerate(layers):
            ks = [k for k, (gli, _) in enumerate(part) if gli == li]
            if not ks:
                continue
            rows = torch.tensor([2 * n_pairs + k * n_pairs + p for k in ks for p in range(n_pairs)])
            mask = torch.stack([masks[part[k][1]] for k in ks for _ in range(n_pairs)])[..., None]
            writes.append(LayerWrite(layer, rows, torch.arange(n_pairs).repeat(len(ks)), mask))
        chunks.append(FullChunk(part, writes))
    return chunks


def run_full_patching(lm, prompts, cfg: PatchConfig, candidates=None, on_chunk=None, done: dict | None = None):
    """The plain engine (``engine="full"``): every patched row runs the whole prompt through every layer."""
    inp = sweep_inputs(lm, prompts, cfg, candidates)
    base, source, layers, cells, answer, wrong = inp.base, inp.source, inp.layers, inp.cells, inp.answer, inp.wrong
    P, T = base["input_ids"].shape
    chunks = plan_chunks(cfg, P, layers, cells, T, lm.arch.n_heads)
    values = torch.full((P, len(layers), len(cells)), float("nan"))
    base_v = source_v = None
    t0 = time.perf_counter()
    done = done or {}

    def forward(chunk: FullChunk) -> Forward:
        n = len(chunk.cells) + 2
        writes = [Write(cfg.site, w.layer, w.rows, mask=w.mask, src=None if cfg.mode == "deletion" else w.pairs)
                  for w in chunk.writes]
        return Forward(_chunk_inputs(base, source, len(chunk.cells)),
                       Readout(inp.metric, answer.repeat(n, 1), wrong.repeat(n, 1), candidates), writes,
                       n_heads=lm.arch.n_heads)

    todo = [i for i in range(len(chunks)) if i not in done]
    if lm.remote:
        fresh = dict(zip(todo, run_forwards(lm.model, [forward(chunks[i]) for i in todo], lm.remote)))
    for i in range(len(chunks)):
        if i in done:
            out = done[i]
        elif lm.remote:
            out = fresh[i][0]
        else:
            out = run_forwards(lm.model, [forward(chunks[i])])[0][0]
        out = torch.as_tensor(out).float().cpu()
        source_v, base_v = out[:P], out[P:2 * P]
        for k, (li, ci) in enumerate(chunks[i].cells):
            values[:, li, ci] = out[2 * P + k * P: 2 * P + (k + 1) * P]
        if on_chunk is not None and i not in done:
            on_chunk(i, out)
    base_v, source_v, values = inp.fold(base_v), inp.fold(source_v), inp.fold(values)
    if cfg.mode == "deletion":
        source_v = torch.zeros_like(base_v)
    return PatchResult(config=cfg, layers=layers, cells=cells, values=values, base=base_v, source=source_v,
                       timings={"sweep_s": time.perf_counter() - t0, "forwards": len(chunks)})


def _chunk_inputs(base: dict, source: dict, n_cells: int) -> dict:
    return {k: torch.cat([source[k], base[k]] + [base[k]] * n_cells) for k in base}


# -- labels and figures -----------------------------------------------------------------------------
def heatmap_labels(prompts, tokenizer=None) -> list[str]:
    """One heatmap label per padded position: the token (the first prompt's, marked ``*`` when prompts
    differ there) and, when most prompts give the position a role, the role (first in ``prompts.roles``
    order, so principal roles like "S2" win over neighbours like "S1+1")."""
    ids = prompts.input_ids
    labels = []
    for p in range(ids.shape[1]):
        tok = tokenizer.decode([int(ids[0, p])]) if tokenizer is not None else str(int(ids[0, p]))
        tok = tok.replace("\n", "\\n") + ("" if bool((ids[:, p] == ids[0, p]).all()) else "*")
        role = next((name for name, pos in prompts.roles.items() if (pos == p).float().mean() >= 0.5), None)
        labels.append(f"{p} {tok!r}" + (f" [{role}]" if role else ""))
    return labels


def role_effect(result: PatchResult, prompts, roles: list[str] | None = None):
    """Per-pair role positions gathered from a (layer x position) result: (role names, [layers, roles]).

    Prompts of different templates put a role at different positions; this reads each pair's effect at
    its own position of the role (mean normalised effect over pairs), so mixed templates still line up.
    """
    if result.config.by != "position" or result.config.region != "position":
        raise UserError("role effects need --by position with --region position")
    where = {c: j for j, c in enumerate(result.cells)}
    names, cols = [], []
    for name in roles or list(prompts.roles):
        pos = prompts.roles[name].tolist()
        if all(p in where for p in pos):
            idx = torch.tensor([where[p] for p in pos])
            cols.append(result.normalized[torch.arange(len(pos)), :, idx].nanmean(0))
            names.append(name)
    return names, (torch.stack(cols, dim=1) if cols else torch.zeros(len(result.layers), 0))


def plot_patching(result: PatchResult, labels: list[str], path, matrix: torch.Tensor | None = None,
                  title: str | None = None) -> str:
    """Heatmap (layers x cells) of the mean normalised effect, or of ``matrix``; written to ``path`` (PNG)."""
    from interpkit.plots import pyplot, save_cropped

    m = (result.effect() if matrix is None else matrix).float()
    lim = float(m.nan_to_num().abs().max()) or 1.0
    fig, ax = pyplot().subplots(figsize=(max(4.0, 0.32 * len(labels) + 2.5), max(2.5, 0.3 * len(result.layers) + 1.6)))
    im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(result.layers)), [str(l) for l in result.layers], fontsize=7)
    ax.set_ylabel("layer")
    cfg = result.config
    ax.set_title(title or f"{result.method} patching, {cfg.site}, {cfg.direction}", fontsize=9)
    fig.colorbar(im, ax=ax, label="normalised effect (0 = base run, 1 = source run)")
    return save_cropped(fig, path)
