"""Edge interventions: remove (or boost) a signal at the downstream head's query or key input only.

How the edit is applied (the design choice): editing the normalised input x^ of head h's query at the
destination d by delta changes only h's query there, q_d' = q_d + delta W_Q[h], so only row d of h's
pre-softmax scores changes: scores[d, p] += scale * (delta W_Q[h]) M(d - p) k_p. Editing h's key input
at the source s changes only column s: scores[p, s] += scale * q_p M(p - s) (delta W_K[h]). Both are
computed outside the trace from the clean run's queries and keys (an edit at layer l cannot change
layer l's other queries or keys) and added to the attention mask argument of the model's attention
function for head h only (``attn.source.attention_interface_1``; the mask is additive and per row),
with Gemma-2's softcap applied exactly: added = cap*tanh((raw + change)/cap) - cap*tanh(raw/cap).
This edits one head even under grouped-query attention, where writing the shared key (or the layer
input) would also change the other heads of the group, and it is the same code for every family. It
equals writing delta W_Q / delta W_K into the model's own query / key tensors (checked in the tests,
to 1e-5 in attention). Many edits run as rows of one batch (one edit per row) and the changes travel
as sparse (index, value) lists, so a remote request stays small. Each batch is a forward of the sweep
engine (``interpkit.engine``): one ``ScoreAdd`` write per edited layer, a readout of the logit
difference and the edited layers' attention patterns; remotely every batch goes in one request.

What is removed:
- ``edge``: the upstream component's output (normalised for the downstream layer) projected onto the
  downstream edge's signal subspace (U_S for q, V_S for k), subtracted ("remove") or added ("boost")
  at the destination (q) or source (k) position (Franco & Crovella 2025, "local" interventions);
- ``input``: the whole input's projection onto the signal subspace ("full signal removal");
- controls ("random"): the same, projected instead on as many of the side's other singular vectors,
  drawn at random (fewer if fewer remain; ``n_control`` records the size).
Effects: delta logit difference (absolute logit units; relative too) and delta A[d, s] of the edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.analyses.attention_tracing.decompose import collect, decompose, load_weights
from interpkit.analyses.attention_tracing.signals import edge_signal, raw_scores
from interpkit.engine.inside import ATTN_PATTERN, Forward, Readout, ScoreAdd
from interpkit.engine.run import run_forwards
from interpkit.progress import stage


@dataclass
class Edit:
    """One row: change head (layer, head)'s normalised ``side`` input by ``delta``, at ``dest`` for the
    query side, at ``src`` for the key side; (dest, src) is the edge whose attention is reported."""

    prompt: int
    layer: int
    head: int
    dest: int
    src: int
    side: str
    delta: torch.Tensor            # [d] in the layer's normalised input space
    info: dict                     # copied into the result row (edge ids, mode, sizes)


def score_change(omega, dec, e: Edit) -> torch.Tensor:
    """Added pre-softmax scores [n, n] of head e.head (softcap included) for edit e."""
    f = omega.factors(e.layer)
    n = dec.n
    change = torch.zeros(n, n, dtype=torch.float64)
    if e.side == "q":
        dq = e.delta @ f.W_Q[e.head]
        p = torch.arange(e.dest + 1)
        Ms = omega.rotations(e.dest - p)
        k = dec.k[e.layer, e.head, : e.dest + 1]
        kr = k if Ms is None else torch.einsum("pij,pj->pi", Ms, k)
        change[e.dest, : e.dest + 1] = f.scale * (kr @ dq)
        rows = [e.dest]
    else:
        dk = e.delta @ f.W_K[e.head]
        p = torch.arange(e.src, n)
        Ms = omega.rotations(p - e.src)
        q = dec.q[e.layer, e.head, e.src:]
        qr = q if Ms is None else torch.einsum("pi,pij->pj", q, Ms)
        change[e.src:, e.src] = f.scale * (qr @ dk)
        rows = list(range(e.src, n))
    if f.softcap:
        cap = f.softcap
        for r in rows:
            raw = raw_scores(omega, dec, e.layer, e.head, r)
            new = raw + change[r, : r + 1]
            change[r, : r + 1] = cap * torch.tanh(new / cap) - cap * torch.tanh(raw / cap)
    return change


def apply_edits(lm, omega, prompts, edits: list[Edit], max_rows: int = 64, decs: dict | None = None):
    """Run edits (one per row, plus one unedited row per prompt); a DataFrame row per edit. Each batch
    of rows is one engine ``Forward`` (``edit_forward``): locally run one by one, remotely all in one
    request."""
    import pandas as pd

    by_prompt: dict[int, list[Edit]] = {}
    for e in edits:
        by_prompt.setdefault(e.prompt, []).append(e)
    decs = decompose_prompts(lm, omega, prompts, sorted(by_prompt), decs)
    plans = [edit_forward(lm, omega, prompts, chunk, decs) for chunk in _chunks(by_prompt, max_rows)]
    with stage("edge interventions", len(plans), "forwards") as bar:
        outs = run_forwards(lm.model, [plan.forward for plan in plans], lm.remote, bar)
    rows = []
    for plan, out in zip(plans, outs):
        rows += _edit_rows(plan, out, decs)
    return pd.DataFrame(rows)


def decompose_prompts(lm, omega, prompts, pids: list[int], decs: dict | None = None,
                      batch_size: int = 16) -> dict:
    """{prompt id: PromptDecomposition} for ``pids`` (one activation trace per batch; reuses ``decs``)."""
    decs = {} if decs is None else decs
    weights = load_weights(lm.arch)
    missing = [p for p in dict.fromkeys(pids) if p not in decs]
    for start in range(0, len(missing), batch_size):
        part = missing[start:start + batch_size]
        acts = collect(lm, prompts.subset(part).batch())
        for b, pid in enumerate(part):
            decs[pid] = decompose(omega, weights, acts, b)
    return decs


def _chunks(by_prompt: dict, max_rows: int):
    chunk, size = [], 0
    for pid, es in by_prompt.items():
        for start in range(0, len(es), max(1, max_rows - 1)):
            part = es[start:start + max_rows - 1]
            if chunk and size + len(part) + 1 > max_rows:
                yield chunk
                chunk, size = [], 0
            chunk.append((pid, part))
            size += len(part) + 1
    if chunk:
        yield chunk


@dataclass
class EditForward:
    """One batch of edit rows as an engine forward: row r edits ``row_edit[r]`` (None: the unedited row
    of prompt ``row_prompt[r]``); the attention patterns of ``layers`` are recorded."""

    forward: Forward
    row_prompt: list[int]
    row_edit: list
    layers: list[int]
    T: int


def edit_forward(lm, omega, prompts, chunk, decs) -> EditForward:
    """The engine forward of one chunk ([(prompt id, edits)]): per edited layer one ``ScoreAdd`` (every
    row's score changes, sparse), the readout the logit difference and the edited layers' patterns."""
    pids = [pid for pid, _ in chunk]
    sub = prompts.subset(pids)
    T = sub.input_ids.shape[1]
    row_prompt, row_edit = [], []
    for i, (pid, es) in enumerate(chunk):
        row_prompt += [i] * (len(es) + 1)
        row_edit += [None] + es
    layers = sorted({e.layer for e in row_edit if e is not None})
    parts: dict[int, list] = {l: [] for l in layers}
    for r, e in enumerate(row_edit):
        if e is None:
            continue
        dec = decs[e.prompt]
        change = score_change(omega, dec, e)
        nz = change.nonzero()
        off = T - dec.n
        index = torch.cat([torch.full((len(nz), 1), r), torch.full((len(nz), 1), e.head), nz + off], dim=1)
        parts[e.layer].append((index, change[nz[:, 0], nz[:, 1]].float()))
    writes = [ScoreAdd(l, torch.cat([i for i, _ in parts[l]]), torch.cat([v for _, v in parts[l]])) for l in layers]
    idx = torch.tensor(row_prompt)
    inputs = {"input_ids": sub.input_ids[idx], "attention_mask": sub.attention_mask[idx]}
    wrong = sub.wrong_ids if sub.wrong_ids is not None else torch.full_like(sub.answer_ids, -1)
    readout = Readout("logit_diff", sub.answer_ids[idx], wrong[idx], records=[(ATTN_PATTERN, l) for l in layers],
                      keep=0)                                      # every position's logits, as before
    return EditForward(Forward(inputs, readout, writes, n_heads=lm.arch.n_heads), row_prompt, row_edit, layers, T)


def _edit_rows(plan: EditForward, out: tuple, decs) -> list[dict]:
    """The result rows of one ``EditForward`` from its (logit differences, answers, patterns)."""
    ld, pats = torch.as_tensor(out[0]), dict(zip(plan.layers, [torch.as_tensor(p) for p in out[2]]))
    rows, base_row = [], {}
    for r, e in enumerate(plan.row_edit):
        if e is None:
            base_row[plan.row_prompt[r]] = r
            continue
        b = base_row[plan.row_prompt[r]]
        off = plan.T - decs[e.prompt].n
        a_new = float(pats[e.layer][r, e.head, e.dest + off, e.src + off])
        a_old = float(pats[e.layer][b, e.head, e.dest + off, e.src + off])
        ld0, ld1 = float(ld[b]), float(ld[r])
        rows.append(dict(prompt=e.prompt, layer=e.layer, head=e.head, dest=e.dest, src=e.src, side=e.side,
                         **e.info, attn=a_old, attn_edited=a_new, d_attn=a_new - a_old, logit_diff=ld0,
                         logit_diff_edited=ld1, d_logit_diff=ld1 - ld0,
                         rel_logit_diff=(ld1 - ld0) / abs(ld0) if ld0 else float("nan")))
    return rows


# -- building edits -------------------------------------------------------------------------------
def _control_basis(sig, gen: torch.Generator) -> torch.Tensor:
    rest = torch.tensor([k for k in range(sig.core.shape[1]) if k not in set(sig.selected.tolist())], dtype=torch.long)
    pick = rest[torch.randperm(len(rest), generator=gen)[: len(sig.selected)]]
    return sig.core[:, pick]


def signal_edits(omega, dec, prompt: int, layer: int, head: int, dest: int, src: int, side: str, share: float,
                 vector: torch.Tensor | None = None, modes=("remove", "random"), gen=None, info=None,
                 decimals: int | None = 5) -> list[Edit]:
    """Edits of one edge side: ``vector`` (normalised upstream output at the edited position) projected
    on the signal subspace, or the whole input if ``vector`` is None ("full signal removal")."""
    sig = edge_signal(omega, dec, layer, head, dest, src, side, share, decimals)
    if len(sig.selected) == 0:
        return []
    pos = dest if side == "q" else src
    x = dec.xhat[layer, pos] if vector is None else vector
    gen = gen or torch.Generator().manual_seed(0)
    out = []
    for mode in modes:
        basis = _control_basis(sig, gen) if mode.startswith("random") else sig.basis
        proj = basis @ (basis.T @ x)
        delta = proj if mode == "boost" else -proj
        out.append(Edit(prompt, layer, head, dest, src, side, delta,
                        dict(info or {}, mode=mode, n_signal=len(sig.selected), n_control=basis.shape[1],
                             rank=sig.core.shape[1], what="input" if vector is None else "edge")))
    return out


def upstream_vector(dec, node: dict, layer: int, pos: int) -> torch.Tensor | None:
    """The upstream node's output at ``pos``, normalised for ``layer`` (centred for LayerNorm, / sigma)."""
    kind = node["kind"]
    if kind == "head":
        t = int(node["src_pos"])
        if t < 0:
            return None
        l, h = int(node["layer"]), int(node["head"])
        v = dec.A[l, h, pos, t] * dec.vW[l, h, t]
        v = v * dec.post[l, pos] if dec.post is not None else v
    elif kind == "mlp":
        v = dec.mlp[int(node["layer"]), pos]
    elif kind == "attn_bias":
        l = int(node["layer"])
        v = dec.bias[l] * dec.post[l, pos] if dec.post is not None else dec.bias[l]
    elif kind == "embed":
        v = dec.embed[pos]
    else:
        return None
    v = v - v.mean() if dec.centred else v
    return v / dec.sigma[layer, pos]


# -- drivers --------------------------------------------------------------------------------------
@dataclass
class CircuitConfig:
    """Thresholds of the intervention and pruning steps (defaults: the paper's)."""

    signal_share: float = 1.0          # must match the trace's
    signal_decimals: int | None = 5    # must match the trace's
    modes: tuple = ("remove", "boost", "random")
    max_prompts_per_edge: int = 32
    min_prompts: int = 15              # keep edges seen in at least this many prompts (paper: 30 GPT-2 IOI)
    min_effect: float = 0.2            # ... and with |mean delta logit diff| >= this (logit units)
    max_rows: int = 64                 # rows per forward
    seed: int = 0


def edge_interventions(lm, omega, prompts, graphs: dict, unified, cfg: CircuitConfig, decs: dict | None = None):
    """Intervene on every non-root edge of ``unified`` in the prompts it was traced in.

    ``graphs``: {prompt id: per-prompt graph}. Returns a DataFrame (one row per edge, prompt and mode)
    with columns up, down, side, mode, d_logit_diff, d_attn, ...
    """
    from interpkit.analyses.attention_tracing.graphs import edge_prompts

    todo = []
    for u, v, key in unified.edges(keys=True):
        if key == "logit":
            continue
        for pid in edge_prompts(unified, u, v, key)[: cfg.max_prompts_per_edge]:
            todo.append((u, v, key, pid))
    decs = decompose_prompts(lm, omega, prompts, [t[3] for t in todo], decs)
    gen = torch.Generator().manual_seed(cfg.seed)
    edits = []
    for u, v, key, pid in todo:
        G = graphs[pid]
        down, up = G.nodes[v], G.nodes[u]
        layer, head, d, s = int(down["layer"]), int(down["head"]), int(down["dest_pos"]), int(down["src_pos"])
        pos = d if key == "q" else s
        vec = upstream_vector(decs[pid], up, layer, pos)
        if vec is None:
            continue
        edits += signal_edits(omega, decs[pid], pid, layer, head, d, s, key, cfg.signal_share, vector=vec,
                              modes=cfg.modes, gen=gen, info=dict(up=u, down=v), decimals=cfg.signal_decimals)
    if not edits:
        import pandas as pd

        return pd.DataFrame(columns=["up", "down", "side", "mode", "d_logit_diff", "d_attn"])
    return apply_edits(lm, omega, prompts, edits, cfg.max_rows, decs)


def signal_removal(lm, omega, prompts, records, share: float = 1.0, max_edges: int = 200, seed: int = 0,
                   modes=("remove", "random"), max_rows: int = 64, decimals: int | None = 5):
    """Remove each traced edge side's whole signal subspace from the head's input, and a random
    equal-size subspace of the same Omega as a control. ``records``: ``AttnTraceResult.records``."""
    recs = [r for r in records if r["n_selected"] > 0][:max_edges]
    decs = decompose_prompts(lm, omega, prompts, [r["prompt"] for r in recs])
    gen = torch.Generator().manual_seed(seed)
    edits = []
    for r in recs:
        edits += signal_edits(omega, decs[r["prompt"]], r["prompt"], r["layer"], r["head"], r["dest"], r["src"],
                              r["side"], share, modes=modes, gen=gen, decimals=decimals)
    return apply_edits(lm, omega, prompts, edits, max_rows, decs)
