"""Attention-causal tracing of prompts (ACC; Franco & Crovella 2025) as a work queue.

Per prompt:
1. Seeds: the final residual at the last position, decomposed into embedding, every head per source
   token, every MLP and attention-output bias, divided by the final norm's scale (and centred for
   LayerNorm), dotted with the task's logit direction (mean W_U[answers] - mean W_U[wrong], times the
   final norm's gain). The fewest largest components reaching ``seed_share`` of the total (or
   ``seed_share_fallback`` if that needs more than ``max_seeds``) become edges into the root.
2. Each seed head (l, h, dest, src) with above-uniform attention (A >= attn_factor / #sources) enters a
   queue. For a queued edge and each side (q, k) the signal (``signals.edge_signal``) is the minimal
   set of Omega's singular components carrying ``signal_share`` of the relative score; every upstream
   component (layers < l) is projected on it (``decompose.contributions``); the fewest largest
   contributors covering ``upstream_share`` become edges ``up -> (l, h, dest, src)`` keyed by side;
   upstream heads that pass the attention test (and sit at layer >= ``min_trace_layer``) are queued.
   MLPs, biases and the embedding are leaves. Each edge is traced once per prompt (no recursion).

Query-side upstream components live at the destination; key-side ones at the source, attributed by
how much more they point along the signal at the source than at the competing positions (the same
relative comparison as the score), so a component that writes the same everywhere gets ~0.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import networkx as nx
import torch

from interpkit.analyses.attention_tracing import graphs as gr
from interpkit.analyses.attention_tracing.decompose import (Contributions, collect, contributions, decompose,
                                                  load_weights, logit_direction)
from interpkit.analyses.attention_tracing.signals import edge_signal, minimal_set
from interpkit.errors import UserError


LABELS = ("role", "tokens", "position")


@dataclass
class AttnTraceConfig:
    """Every threshold of the tracing algorithm (defaults: the paper's)."""

    task: str = "ioi"
    n_prompts: int = 16
    seed: int = 0
    batch_size: int = 8
    attn_factor: float = 1.0          # trace (l,h,d,s) only if A[d,s] >= attn_factor / (d + 1)
    signal_share: float = 1.0         # share of the relative score the selected components must reach
    seed_share: float = 1.0           # share of the logit difference the seeds must reach
    seed_share_fallback: float = 0.5  # used when seed_share needs more than max_seeds components
    max_seeds: int = 64
    upstream_share: float = 0.7       # share of a signal the upstream contributors must cover
    min_trace_layer: int = 1          # heads below this layer are leaves (the paper stops at layer 0)
    require_correct: bool = True      # skip prompts whose top prediction is not an answer
    max_edges: int = 5000             # safety cap on traced edges per prompt
    labels: str = "role"              # "role": task roles, else token text; "tokens": token text only
                                      # (the paper's -tt; repeats numbered #2, #3); "position": pos<i>
    center: bool = True               # centre W_Q/W_K over d_model for LayerNorm models (the paper's weights)
    signal_decimals: int | None = 5   # the paper's rounding of the cumulative share (None: exact)

    def validate(self) -> None:
        shares = dict(signal_share=self.signal_share, seed_share=self.seed_share,
                      seed_share_fallback=self.seed_share_fallback, upstream_share=self.upstream_share)
        for name, v in shares.items():
            if not 0 < v <= 1:
                raise UserError(f"{name}={v} must be in (0, 1]")
        if self.attn_factor < 0 or self.batch_size < 1 or self.n_prompts < 1:
            raise UserError("attn_factor must be >= 0, batch_size and n_prompts >= 1")
        if self.labels not in LABELS:
            raise UserError(f"labels={self.labels!r}; use {', '.join(LABELS)}")


@dataclass
class AttnTraceResult:
    """Per-prompt graphs (None where a prompt was skipped), why, and one record per traced edge side."""

    config: AttnTraceConfig
    graphs: list
    status: list[str]
    records: list[dict]
    timings: dict = field(default_factory=dict)

    @property
    def traced(self) -> list[int]:
        return [i for i, g in enumerate(self.graphs) if g is not None]

    def unified(self) -> nx.MultiDiGraph:
        return gr.unify([self.graphs[i] for i in self.traced], self.traced)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.records)


# -- labels -----------------------------------------------------------------------------------------
def node_labels(prompts, row: int, offset: int, tokens: list[str], mode: str = "role") -> list[str]:
    """A graph-node label per position (without padding): the task role there, else the token text (#k if repeated);
    ``mode="tokens"``: the token text everywhere; ``"position"``: pos<i>."""
    n = len(tokens)
    if mode == "position":
        return [f"pos{p}" for p in range(n)]
    labels: list[str | None] = [None] * n
    for role, pos in (prompts.roles.items() if mode == "role" else ()):
        p = int(pos[row]) - offset
        if 0 <= p < n and labels[p] is None:
            labels[p] = role
    seen: dict[str, int] = {}
    for p, tok in enumerate(tokens):
        if labels[p] is None:
            text = tok.strip().replace("|", "/") or repr(tok)
            seen[text] = seen.get(text, 0) + 1
            labels[p] = text if seen[text] == 1 else f"{text}#{seen[text]}"
    return labels


# -- candidates -------------------------------------------------------------------------------------
class Candidates:
    """Flat view of a ``Contributions`` (heads per source token up to ``last_src``, folded rest, leaves)."""

    def __init__(self, con: Contributions, last_src: int, fold_later: bool):
        self.l, self.H, n = con.head.shape
        self.t = last_src + 1
        parts = [con.head[..., : self.t].reshape(-1)]
        self.n_later = 0
        if fold_later and self.t < n:
            parts.append(con.head[..., self.t:].sum(-1).reshape(-1))
            self.n_later = self.l * self.H
        parts.append(con.mlp)
        self.has_bias = con.bias is not None
        if self.has_bias:
            parts.append(con.bias)
        parts.append(con.embed.reshape(1))
        self.values = torch.cat(parts)

    def describe(self, i: int) -> tuple:
        """("head", l, h, t) | ("head", l, h, -1) for the folded rest | ("mlp", l) | ("attn_bias", l) | ("embed",)"""
        nh = self.l * self.H * self.t
        if i < nh:
            l, r = divmod(i, self.H * self.t)
            return ("head", l, *divmod(r, self.t))
        i -= nh
        if i < self.n_later:
            return ("head", *divmod(i, self.H), -1)
        i -= self.n_later
        if i < self.l:
            return ("mlp", i)
        i -= self.l
        if self.has_bias and i < self.l:
            return ("attn_bias", i)
        return ("embed",)


def candidate_node(desc: tuple, pos: int, labels: list[str]):
    """The graph node of a ``Candidates.describe`` tuple at position ``pos``."""
    kind = desc[0]
    if kind == "head":
        _, l, h, t = desc
        return gr.node("head", l, h, labels[pos], labels[t] if t >= 0 else "later", pos, t)
    if kind in ("mlp", "attn_bias"):
        return gr.node(kind, desc[1], -1, labels[pos], "", pos)
    return gr.node("embed", -1, -1, labels[pos], "", pos)


def traceable(dec, layer: int, head: int, d: int, s: int, cfg: AttnTraceConfig) -> bool:
    """Whether edge (layer, head, d <- s) is traced: deep enough, >= 2 sources, above-uniform attention."""
    return (layer >= cfg.min_trace_layer and 1 <= d and 0 <= s <= d
            and float(dec.A[layer, head, d, s]) >= cfg.attn_factor / (d + 1))


def seeds(values: torch.Tensor, cfg: AttnTraceConfig) -> torch.Tensor:
    """Components selected at the logit: the minimal set reaching ``seed_share``, or the fallback share
    when that set is larger than ``max_seeds``."""
    sel = minimal_set(values, cfg.seed_share)
    return minimal_set(values, cfg.seed_share_fallback) if len(sel) > cfg.max_seeds else sel


class Frontier:
    """The breadth-first search's queue: head edges (layer, head, dest, src) still to trace, each once,
    and only those ``traceable`` admits."""

    def __init__(self, dec, cfg: AttnTraceConfig):
        self.dec, self.cfg, self.queue, self.seen = dec, cfg, deque(), set()

    def push(self, desc: tuple, pos: int) -> None:
        if desc[0] == "head" and desc[3] >= 0 and traceable(self.dec, desc[1], desc[2], pos, desc[3], self.cfg):
            key = (desc[1], desc[2], pos, desc[3])
            if key not in self.seen:
                self.seen.add(key)
                self.queue.append(key)

    def pop(self) -> tuple:
        return self.queue.popleft()

    def __bool__(self) -> bool:
        return bool(self.queue)


# -- one prompt -------------------------------------------------------------------------------------
def trace_prompt(omega, dec, direction: torch.Tensor, labels: list[str], cfg: AttnTraceConfig, prompt: int = 0):
    """(graph or None, records, status) for one decomposed prompt."""
    L, end = omega.arch.n_layers, dec.n - 1
    G = nx.MultiDiGraph(prompt=prompt, offset=dec.offset, n=dec.n)
    root = gr.node("root", L, -1, labels[end], "", end)
    con = contributions(dec, L, torch.tensor([end]), direction[:, None], torch.ones(1, 1, dtype=direction.dtype),
                        dec.sigma_final[[end]])
    cand = Candidates(con, end, fold_later=False)
    sel = seeds(cand.values, cfg)
    if len(sel) == 0:
        return None, [], "logit difference <= 0"
    frontier = Frontier(dec, cfg)
    for i in sel.tolist():
        desc = cand.describe(i)
        gr.add_edge(G, candidate_node(desc, end, labels), root, "logit", float(cand.values[i]))
        frontier.push(desc, end)
    records = []
    while frontier and len(records) < 2 * cfg.max_edges:
        layer, head, d, s = frontier.pop()
        down = gr.node("head", layer, head, labels[d], labels[s], d, s)
        for side in ("q", "k"):
            sig = edge_signal(omega, dec, layer, head, d, s, side, cfg.signal_share, cfg.signal_decimals)
            records.append(dict(prompt=prompt, layer=layer, head=head, dest=d, src=s, side=side,
                                n_selected=len(sig.selected), rank=len(sig.comps), total=sig.total,
                                selected_total=sig.selected_total, bias=sig.bias,
                                attention=float(dec.A[layer, head, d, s])))
            if len(sig.selected) == 0:
                continue
            con = contributions(dec, layer, sig.positions, sig.B, sig.C, dec.sigma[layer, sig.positions])
            pos = d if side == "q" else s
            cand = Candidates(con, pos, fold_later=side == "k")
            for i in minimal_set(cand.values, cfg.upstream_share).tolist():
                desc = cand.describe(i)
                gr.add_edge(G, candidate_node(desc, pos, labels), down, side, float(cand.values[i]))
                frontier.push(desc, pos)
    return G, records, "traced"


# -- many prompts -----------------------------------------------------------------------------------
def correct_rows(logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Whether each row's top prediction is one of its answers."""
    top = logits.argmax(-1, keepdim=True)
    return ((answer_ids == top) & (answer_ids >= 0)).any(-1)


def trace_batch(lm, omega, weights, prompts, rows: list[int], cfg: AttnTraceConfig, acts: dict | None = None):
    """Trace prompts ``rows`` of a PromptSet with one activation trace; returns (graphs, status, records)."""
    sub = prompts.subset(rows)
    acts = collect(lm, sub.batch()) if acts is None else acts
    ok = correct_rows(acts["logits"], sub.answer_ids)
    wrong = sub.wrong_ids if sub.wrong_ids is not None else torch.full_like(sub.answer_ids, -1)
    graphs, status, records = [], [], []
    for b, pid in enumerate(rows):
        if cfg.require_correct and not bool(ok[b]):
            graphs.append(None), status.append("wrong prediction")
            continue
        dec = decompose(omega, weights, acts, b)
        ids = sub.input_ids[b, dec.offset:].tolist()
        tokens = [lm.tokenizer.decode([i]) for i in ids]
        labels = node_labels(sub, b, dec.offset, tokens, cfg.labels)
        direction, _ = logit_direction(weights, sub.answer_ids[b], wrong[b])
        G, rec, st = trace_prompt(omega, dec, direction, labels, cfg, prompt=pid)
        graphs.append(G), status.append(st), records.extend(rec)
    return graphs, status, records


def trace_prompts(lm, prompts, cfg: AttnTraceConfig, omega=None, on_batch=None, skip=None) -> AttnTraceResult:
    """Trace every prompt of ``prompts`` in batches of ``cfg.batch_size`` (one trace per batch).

    ``on_batch(i, rows, graphs, status, records)`` is called after each batch (the CLI stores it);
    ``skip(i)`` -> (graphs, status, records) returns a stored batch instead of recomputing (resume).
    """
    from interpkit.analyses.attention_tracing.omega import Omega, default_cache_dir

    cfg.validate()
    t0 = time.perf_counter()
    omega = omega or Omega(lm.arch, lm.name, lm.revision, cache_dir=default_cache_dir(), center=cfg.center)
    if omega.center != cfg.center:
        raise UserError(f"the Omega passed is {'' if omega.center else 'un'}centred but the config asks for "
                        f"center={cfg.center}")
    weights = load_weights(lm.arch)
    result = AttnTraceResult(config=cfg, graphs=[], status=[], records=[])
    for i, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        rows = list(range(start, min(start + cfg.batch_size, len(prompts))))
        stored = skip(i) if skip is not None else None
        out = stored if stored is not None else trace_batch(lm, omega, weights, prompts, rows, cfg)
        result.graphs += out[0]
        result.status += out[1]
        result.records += out[2]
        if on_batch is not None and stored is None:
            on_batch(i, rows, *out)
    omega.save()
    result.timings["trace_s"] = time.perf_counter() - t0
    return result
