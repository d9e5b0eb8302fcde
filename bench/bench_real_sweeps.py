"""Patching sweeps and causal tracing on the real smollm2-135m, timed against their limits and the serial tools.

    python bench/bench_real_sweeps.py [--quick] [--pairs 64] [--repeats 2] [--with-full] [--sections resid,head,ct]

Model: ``load_model("smollm2-135m")`` (LlamaForCausalLM, 30 layers, d_model 576, 9 heads / 3 KV heads).

Sections (each row runs in its own subprocess: ``--row NAME``; the child times its compute alone, model
load and setup excluded, and prints one ``RESULT {json}`` line with its own peak RSS. Repeats are
interleaved row by row; an engine row's ratio to its limit is the mean of its side-by-side ratios, the
other rows keep their minimum time: the machine is shared):

* resid: IOI (abc corruption, denoise, logit difference), ``--pairs`` pairs whose clean and corrupted
  prompts need no padding (one template length, 20 tokens), resid_pre x every layer x every position.
  - engine: ``run_patching(lm, prompts, PatchConfig(site="resid_pre"))`` (the default engine)
  - full:   ``engine="full"`` (only with ``--with-full``; slow)
  - the engine's limit: the naive limit, one plain HF forward row per patched (pair, cell), in batches of
            ``max_rows`` rows of the full base prompts, ``logits_to_keep=1``, no nnsight; every batch has
            the same shape, so ``--limit-batches`` of them are timed and scaled to the total count. They
            are timed *side by side* with the engine, in its process, between its chunks (evenly
            spaced; each in a forked copy, so the engine's peak RSS stays its own): the ratio of the
            two is not moved by the machine's speed drifting between runs (it drifts by 15-25% here)
  - tl:     TransformerLens 3.9 ``patching.get_act_patch_resid_pre`` (one forward per cell) on a
            HookedTransformer holding identical weights (no folding or centring; its logits are checked
            against HF's first), with its ``run_with_cache`` of the clean run; ``--tl-samples`` random
            cells are timed (``index_df``) and scaled to the full grid, and its metric on those cells is
            compared with the engine's ``values[:, layer, cell].mean(0)``
* head:   the same with ``PatchConfig(site="head_out", by="head")`` (every layer x head, all positions);
          TL: ``get_act_patch_attn_head_out_all_pos``
* ct:     causal tracing of one known_1000 fact that the model knows (top-1 filter over ``--ct-facts``
          drawn facts; noise 3 sigma of their subject embeddings), ``TraceConfig(kinds=all, severed=True)``
          (the CLI's ``--kind all --severed``):
  - ct_engine:  ``trace_facts`` with the default engine (prefix), the whole grid; its limit, timed side
                by side as above (``--ct-limit-batches`` forwards): the batched engine's rows as plain HF
                forwards (bench/bench_causal_tracing.py's limit)
  - ct_batched: ``engine="batched"``: ``--ct-forwards`` of its forwards (evenly spaced) timed, scaled by rows
  - ct_loop:    ROME's loop, one forward (two for severed) per restoration
                (``tests/references/causal_tracing_ref.ReferenceTracer``): ``--loop-samples`` restorations per kind
                timed and scaled per kind to the whole grid

Targets (issue): resid and head engine <= 0.15x the limit and >= 20x faster than TL, equal to 1e-4;
causal tracing engine >= 10x faster than the loop and <= 0.3x its limit. Besides, per engine row, the
exact floor: the least token-layers any exact engine computes (every row from its own first written
position and layer), as a fraction of the limit's, and the bound it puts on each ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODEL = "smollm2-135m"
SECTIONS = {"resid": ["engine_resid", "tl_resid"],
            "head": ["engine_head", "tl_head"],
            "ct": ["ct_engine", "ct_batched", "ct_loop"]}


# --------------------------------------------------------------------------------------------------
# shared setup (children)
# --------------------------------------------------------------------------------------------------
def load(args):
    torch.set_num_threads(args.threads)
    from interpkit.models import load_model

    return load_model(MODEL)


def ioi_pairs(lm, n_pairs: int):
    """The first ``n_pairs`` IOI pairs (seed 0) whose clean and corrupted prompts have no padding."""
    from interpkit.tasks import ioi

    n = 512
    while True:
        ps = ioi.build(lm.tokenizer, n=n, seed=0)
        full = ps.attention_mask.bool().all(1) & ps.corrupted_mask.bool().all(1)
        keep = full.nonzero().reshape(-1)
        if len(keep) >= n_pairs:
            return ps.subset(keep[:n_pairs])
        n *= 2


def patch_cfg(site: str, args, **kw):
    from interpkit.analyses.patching.sweep import PatchConfig

    if site == "resid":
        return PatchConfig(site="resid_pre", max_rows=args.max_rows, **kw)
    return PatchConfig(site="head_out", by="head", max_rows=args.max_rows, **kw)


def n_cells(lm, ps, site: str) -> int:
    return ps.input_ids.shape[1] if site == "resid" else lm.arch.n_heads


def sample_cells(lm, ps, site: str, k: int, seed: int = 0) -> list[tuple[int, int]]:
    L, C = lm.arch.n_layers, n_cells(lm, ps, site)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(L * C, generator=g)[:k].tolist()
    return sorted(divmod(i, C) for i in idx)


# --------------------------------------------------------------------------------------------------
# rows: patching
# --------------------------------------------------------------------------------------------------
def row_engine(args, site: str, engine: str = "prefix") -> dict:
    from interpkit.analyses.patching.sweep import plan_patching, run_patching

    lm = load(args)
    ps = ioi_pairs(lm, args.pairs)
    cfg = patch_cfg(site, args, engine=engine)
    piece, n_pieces, limit_note, piece_tokens, piece_rows = limit_batch(lm, ps, site, args)
    with torch.no_grad():                                   # warm-up: a one-cell sweep
        run_patching(lm, ps.subset([0]), patch_cfg(site, args, layers=[lm.arch.n_layers - 1], engine=engine,
                                                   **({"positions": [ps.input_ids.shape[1] - 1]}
                                                      if site == "resid" else {})))
        n_chunks = len(plan_patching(lm, ps, cfg).plan.chunks) if engine == "prefix" else 0
        (res, s), lim = interleaved(lambda: run_patching(lm, ps, cfg), n_chunks, args.limit_batches, piece)
    tm = res.timings
    note = (f"{tm.get('forwards')} forwards, work {tm['work']:.3f} of full, skipped {tm['skipped']:.2f}"
            if "work" in tm else f"{tm.get('forwards')} forwards")
    out = {"seconds": s, "note": note, "mean": res.values.mean(0).tolist(), "shape": list(res.values.shape),
           "floor": patch_floor(lm, ps, patch_cfg(site, args))}
    return {**out, **paired_limit(lim, n_pieces, limit_note),
            **matmul_share(lm, piece_tokens, piece_rows, sum(lim) / len(lim))}


def patch_floor(lm, ps, cfg) -> float:
    """The least token-layers any exact engine computes, as a fraction of the limit's: every row from its
    own first written position and layer (the planner with zero fixed costs: one forward per start)."""
    from interpkit.analyses.patching.sweep import plan_patching
    from interpkit.engine.plan import ForwardCost

    model_costs = ForwardCost.for_model
    ForwardCost.for_model = classmethod(lambda cls, arch: cls(0, 0))
    try:
        return plan_patching(lm, ps, cfg).plan.work
    finally:
        ForwardCost.for_model = model_costs


def interleaved(run, n_chunks: int, k: int, piece) -> tuple:
    """``run()`` with ``piece()`` (one batch of the limit) run and timed after k of its ``n_chunks``
    suffix chunks, evenly spaced, so that the engine and its limit are measured side by side on the same
    machine state: ((run's result, run's seconds without the pieces), [seconds of each piece]). With no
    chunks (the full engine) the pieces run after it. Each piece runs in a forked copy of this process,
    so the memory it takes does not count in the engine's peak RSS."""
    import interpkit.engine.run as R

    after = {max(1, round((i + 1) * n_chunks / (k + 1))) for i in range(k)} if n_chunks else set()
    inner, done, inside, outside = R.run_chunk, [0], [], []

    def timed(into: list) -> None:                         # in a forked process: the engine's peak RSS stays its own
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            t = time.perf_counter()
            piece()
            os.write(w, repr(time.perf_counter() - t).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            into.append(float(f.read()))
        os.waitpid(pid, 0)

    def chunk(*a):
        out = inner(*a)
        done[0] += 1
        if done[0] in after:
            timed(inside)
        return out

    R.run_chunk = chunk
    try:
        t = time.perf_counter()
        result = run()
        total = time.perf_counter() - t
    finally:
        R.run_chunk = inner
    while len(inside) + len(outside) < k:
        timed(outside)
    return (result, total - sum(inside)), inside + outside


def paired_limit(times: list, n_pieces: float, note: str) -> dict:
    """The limit's total seconds from its timed pieces, scaled to all ``n_pieces`` of them."""
    return {"limit_seconds": sum(times) / len(times) * n_pieces, "limit_note": f"{note}; {len(times)} timed"}


def matmul_share(lm, tokens: int, rows: int, piece_seconds: float) -> dict:
    """How much of one limit batch is matmul at this machine's peak: the batch's linear-layer flops (every
    layer at all ``tokens``, the unembedding at ``rows`` last positions) over the best rate of the
    model's own layer matmuls (each weight shape at 512, 1024 and 2048 rows, 8 tries each), as a
    fraction of the batch's measured seconds. An exact engine doing only the floor's token-layers, every
    matmul at that peak and everything else free, still takes ``floor x share`` of the limit: a bound
    no engine on this machine can beat."""
    lin = [m for m in lm.hf.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    head = lm.hf.get_output_embeddings().weight
    flops = 2 * (tokens * sum(m.in_features * m.out_features for m in lin) + rows * head.numel())
    peak = 0.0                                               # the fastest rate of any of its layer shapes
    with torch.no_grad():
        for w in {tuple(m.weight.shape): m.weight for m in lin}.values():
            for n in (512, 1024, 2048):
                x = torch.randn(n, w.shape[1])
                for _ in range(8):
                    t = time.perf_counter()
                    torch.nn.functional.linear(x, w)
                    peak = max(peak, 2 * n * w.numel() / (time.perf_counter() - t))
    return {"matmul_share": flops / peak / piece_seconds, "peak_gflops": peak / 1e9}


def limit_batch(lm, ps, site: str, args) -> tuple:
    """The naive limit of a patching sweep, one batch of it: (run one batch, batches in all, note, its
    tokens, its rows). One plain HF forward row per patched (pair, cell), ``max_rows`` rows of the full
    base prompts per batch, ``logits_to_keep=1``, no nnsight; every batch has the same shape."""
    P, T = ps.input_ids.shape
    total = P * lm.arch.n_layers * n_cells(lm, ps, site)      # one row per patched (pair, cell)
    rows = min(args.max_rows, total)
    base = ps.batch(corrupted=True)                         # denoise: the corrupted run is patched
    ids = base["input_ids"].repeat(math.ceil(rows / P), 1)[:rows]
    mask = torch.ones_like(ids)
    return (lambda: lm.hf(input_ids=ids, attention_mask=mask, logits_to_keep=1), total / rows,
            f"batches of {rows}x{T} ({total} rows)", rows * T, rows)


def hooked_transformer(hf):
    """A TransformerLens HookedTransformer with exactly hf's (Llama) weights, no folding or centring."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    c = hf.config
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=2048, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, n_key_value_heads=(c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads
                                                else None),
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=d_head, rotary_base=theta, final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", default_prepend_bos=False, dtype=torch.float32)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


def row_tl(args, site: str) -> dict:
    import pandas as pd
    from transformer_lens import patching

    from interpkit import metrics as M

    lm = load(args)
    ps = ioi_pairs(lm, args.pairs)
    tl = hooked_transformer(lm.hf)
    clean, corrupt = ps.input_ids, ps.corrupted_ids
    with torch.no_grad():                                   # identical weights: same logits (and a warm-up)
        x = clean[:4]
        hf_logits = lm.hf(input_ids=x, attention_mask=torch.ones_like(x)).logits
        logits_diff = (tl(x) - hf_logits).abs().max().item()
    answer, wrong = ps.answer_ids, ps.wrong_ids

    def metric(logits):
        return M.logit_diff(logits[:, -1], answer, wrong).mean()

    cells = sample_cells(lm, ps, site, args.tl_samples)
    index_df = pd.DataFrame(cells, columns=["layer", "pos" if site == "resid" else "head"])
    fn = patching.get_act_patch_resid_pre if site == "resid" else patching.get_act_patch_attn_head_out_all_pos
    with torch.no_grad():
        t = time.perf_counter()
        _, cache = tl.run_with_cache(clean)
        t_cache = time.perf_counter() - t
        t = time.perf_counter()
        vals = fn(tl, corrupt, cache, metric, index_axis_names=None, index_df=index_df)
        t_cells = time.perf_counter() - t
    total = lm.arch.n_layers * n_cells(lm, ps, site)
    return {"seconds": t_cache + t_cells / len(cells) * total, "measured_s": t_cache + t_cells,
            "note": f"scaled from {len(cells)} of {total} cells (+ run_with_cache {t_cache:.1f}s); "
                    f"TL vs HF logits max |diff| {logits_diff:.1e}",
            "cells": cells, "values": vals.tolist(), "logits_diff": logits_diff}


# --------------------------------------------------------------------------------------------------
# rows: causal tracing
# --------------------------------------------------------------------------------------------------
def trace_cfg(args, engine: str = "prefix"):
    from interpkit.analyses.causal_tracing import trace as CT

    return CT.TraceConfig(kinds=list(CT.BASE_KINDS), severed=True, samples=args.ct_samples,
                          max_rows=args.ct_max_rows, engine=engine)


def row_ct_setup(args) -> dict:
    """The traced fact: the first of ``--ct-facts`` drawn known_1000 facts (seed 0) that the model knows
    (top-1 = the attribute's first token) with 8..12 tokens, and the noise level (3 sigma of their
    subject embeddings, as the CLI computes it over its dataset)."""
    from interpkit.analyses.causal_tracing import trace as CT
    from interpkit.tasks import known_facts as KF

    lm = load(args)
    ps = KF.build(lm.tokenizer, n=args.ct_facts, seed=0)
    std, top1 = CT.dataset_pass(lm, ps)
    known = KF.filter_known(ps, top1)
    facts = CT.facts_of(known)
    pick = next((f for f in facts if 8 <= len(f.ids) <= 12), facts[0])
    level = CT.parse_noise(trace_cfg(args).noise)[1] * std
    return {"seconds": 0.0, "known_id": int(pick.key), "level": level, "n_known": len(facts),
            "prompt": known.prompts[pick.index], "T": len(pick.ids),
            "answer": known.meta["attribute"][pick.index]}


def ct_fact(lm, args):
    from interpkit.analyses.causal_tracing import trace as CT
    from interpkit.tasks import known_facts as KF

    records = KF.load_known()
    i = next(j for j, r in enumerate(records) if int(r.get("known_id", j)) == args.known_id)
    ps = KF.build(lm.tokenizer, n=None)
    return CT.facts_of(ps.subset([i]))[0]


def row_ct_engine(args) -> dict:
    from interpkit.analyses.causal_tracing import trace as CT
    from interpkit.analyses.causal_tracing.prefix import FactShape, plan_fact
    from interpkit.engine.plan import ForwardCost

    lm = load(args)
    fact = ct_fact(lm, args)
    cfg = trace_cfg(args)
    L, T = lm.arch.n_layers, len(fact.ids)
    _, _, rows, _ = _ct_forwards(lm, fact, args)
    n = max(rows)
    x = fact.ids[None].expand(n, -1)
    piece = lambda: lm.hf(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1)   # noqa: E731
    shape = FactShape(T, fact.subject_first, L, cfg.window, cfg.samples, cfg.max_rows, 1, ForwardCost.for_model(lm.arch))
    n_chunks = len(plan_fact(CT.grid(cfg.all_kinds(), T, L), shape).chunks)
    with torch.no_grad():
        CT.trace_facts(lm, [fact], cfg, args.level, restorations=lambda f: [("hidden", T - 1, L - 1)])
        (trs, s), lim = interleaved(lambda: CT.trace_facts(lm, [fact], cfg, args.level), n_chunks,
                                    args.ct_limit_batches, piece)
    tr = trs[0]
    return {"seconds": s, "scores": tr.scores.tolist(), "low": tr.low, "high": tr.high,
            "floor": ct_floor(fact, cfg, L),
            "note": f"T={T}, {len(CT.grid(cfg.all_kinds(), T, L))} restorations x "
                    f"{cfg.samples} samples, answer {lm.tokenizer.decode([tr.answer_id])!r}, "
                    f"high {tr.high:.3f} low {tr.low:.3f}",
            **paired_limit(lim, sum(rows) / n, f"plain HF forwards of the batched engine's rows, {n}x{T} each "
                                               f"({sum(rows)} rows)"),
            **matmul_share(lm, n * T, n, sum(lim) / len(lim))}


def ct_floor(fact, cfg, L: int) -> float:
    """The least token-layers any exact restoration-by-restoration engine computes for ``fact``, as a
    fraction of the batched engine's (the limit's rows: every prompt through every layer)."""
    from interpkit.analyses.causal_tracing import trace as CT
    from interpkit.analyses.causal_tracing.prefix import FactShape, first_layer, plan_fact
    from interpkit.engine.plan import ForwardCost

    T, S = len(fact.ids), cfg.samples
    rest = CT.grid(cfg.all_kinds(), T, L)
    plan = plan_fact(rest, FactShape(T, fact.subject_first, L, cfg.window, S, cfg.max_rows, cost=ForwardCost(0, 0)))
    minimal = sum(S * (T - min(x[2] for x in w)) * (L - first_layer(w)) for w in plan.unique)
    return minimal / (len(rest) * S * T * L)


def _ct_forwards(lm, fact, args):
    """The batched engine's forwards for ``fact``: (jobs with their restorations, rows per forward, picked)."""
    from interpkit.analyses.causal_tracing import trace as CT
    from interpkit.analyses.causal_tracing.prefix import FactJob

    cfg = trace_cfg(args, "batched")
    L = lm.arch.n_layers
    rest = CT.grid(cfg.all_kinds(), len(fact.ids), L)
    noise = CT.fact_noise(cfg, fact, lm.arch.d_model, args.level)
    jobs = CT.fact_forwards(FactJob(fact, noise, rest, torch.tensor([-1])), cfg, L)   # -1: the clean top-1
    rows = [int(fwd.noise.rows.shape[0]) for fwd, _ in jobs]
    k = min(args.ct_forwards, len(jobs))
    pick = sorted({round(i * (len(jobs) - 1) / max(k - 1, 1)) for i in range(k)})
    return cfg, jobs, rows, pick


def _timed_forwards(args, run, warm=None) -> tuple:
    """``run(lm, fact, forward, rows)`` on the picked batched-engine forwards, timed (after ``warm(lm, fact,
    cfg)``): (cfg, jobs, picked indices, outputs, {seconds scaled to every forward, measured_s}, note)."""
    lm = load(args)
    fact = ct_fact(lm, args)
    cfg, jobs, rows, pick = _ct_forwards(lm, fact, args)
    with torch.no_grad():
        if warm is not None:
            warm(lm, fact, cfg)
        t = time.perf_counter()
        outs = [run(lm, fact, jobs[i][0], rows[i]) for i in pick]
        s = time.perf_counter() - t
    done = sum(rows[i] for i in pick)
    timing = {"seconds": s / done * sum(rows), "measured_s": s}
    return cfg, jobs, pick, outs, timing, f"scaled from {len(pick)} of {len(jobs)} forwards ({done} of {sum(rows)} rows)"


def row_ct_batched(args) -> dict:
    from interpkit.analyses.causal_tracing import trace as CT
    from interpkit.engine.inside import trace_forward

    def warm(lm, fact, cfg):
        last = [("hidden", len(fact.ids) - 1, lm.arch.n_layers - 1)]
        CT.trace_facts(lm, [fact], cfg, args.level, restorations=lambda f: last)

    cfg, jobs, pick, outs, timing, note = _timed_forwards(args, lambda lm, fact, fwd, n: trace_forward(lm.model, fwd),
                                                          warm)
    kinds, S = cfg.all_kinds(), cfg.samples
    cells, vals = [], []
    for i, (p, _) in zip(pick, outs):
        v = p.double()[1 + S:].view(-1, S).mean(1)
        for (kind, tok, layer), x in zip(jobs[i][1], v.tolist()):
            cells.append((kinds.index(kind), tok, layer))
            vals.append(x)
    return {**timing, "cells": cells, "values": vals, "note": note}


def row_ct_loop(args) -> dict:
    from interpkit.analyses.causal_tracing import trace as CT
    from tests.references.causal_tracing_ref import ReferenceTracer

    lm = load(args)
    fact = ct_fact(lm, args)
    cfg = trace_cfg(args)
    kinds, T, L = cfg.all_kinds(), len(fact.ids), lm.arch.n_layers
    noise = CT.fact_noise(cfg, fact, lm.arch.d_model, args.level)
    g = torch.Generator().manual_seed(0)
    cells, vals, per_kind = [], [], {}
    with torch.no_grad():
        t = time.perf_counter()
        ref = ReferenceTracer(lm.hf, fact.ids, (fact.subject_first, fact.subject_last), noise)
        ref.high_low()
        fixed = time.perf_counter() - t
        for k, kind in enumerate(kinds):
            picks = torch.randperm(T * L, generator=g)[:args.loop_samples].tolist()
            t = time.perf_counter()
            for i in picks:
                tok, layer = divmod(i, L)
                if kind == "hidden":
                    v = ref.hidden(tok, layer)
                elif kind in ("mlp", "attn"):
                    v = ref.window(kind, tok, layer, cfg.window)
                else:
                    v = ref.severed(kind.split("_")[1], tok, layer)
                cells.append((k, tok, layer))
                vals.append(v)
            per_kind[kind] = (time.perf_counter() - t) / len(picks)
    total = fixed + sum(v * T * L for v in per_kind.values())
    n_fwd = 2 + T * L * len(kinds) + T * L * sum(1 for k in kinds if k.startswith("severed"))
    return {"seconds": total, "measured_s": fixed + sum(v * args.loop_samples for v in per_kind.values()),
            "cells": cells, "values": vals,
            "note": f"scaled per kind from {args.loop_samples} of {T * L} restorations ({n_fwd} forwards in all)"}


ROWS = {"engine_resid": lambda a: row_engine(a, "resid"), "engine_head": lambda a: row_engine(a, "head"),
        "full_resid": lambda a: row_engine(a, "resid", "full"), "full_head": lambda a: row_engine(a, "head", "full"),
        "tl_resid": lambda a: row_tl(a, "resid"), "tl_head": lambda a: row_tl(a, "head"),
        "ct_setup": row_ct_setup, "ct_engine": row_ct_engine, "ct_batched": row_ct_batched,
        "ct_loop": row_ct_loop}


# --------------------------------------------------------------------------------------------------
# the parent: one subprocess per row, interleaved repeats, the table
# --------------------------------------------------------------------------------------------------
def child_args(args, row: str) -> list[str]:
    keep = ["--pairs", args.pairs, "--threads", args.threads, "--max-rows", args.max_rows,
            "--limit-batches", args.limit_batches, "--tl-samples", args.tl_samples, "--ct-samples", args.ct_samples,
            "--ct-max-rows", args.ct_max_rows, "--ct-forwards", args.ct_forwards,
            "--ct-limit-batches", args.ct_limit_batches, "--loop-samples", args.loop_samples,
            "--ct-facts", args.ct_facts]
    if args.known_id is not None:
        keep += ["--known-id", args.known_id, "--level", repr(args.level)]
    return [sys.executable, __file__, "--row", row] + [str(x) for x in keep]


def run_child(args, row: str) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    p = subprocess.Popen(child_args(args, row), stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    out = p.stdout.read()
    p.stdout.close()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)        # reaped here: keep Popen from waiting again
    line = next((ln for ln in out.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        print(f"  {row}: FAILED (exit {p.returncode})\n{out[-2000:]}", flush=True)
        return {"failed": True, "rss_mib": ru.ru_maxrss / 1024}
    res = json.loads(line[len("RESULT "):])                 # rss_mib: the child's own peak (not its forks')
    print(f"  {row:<13} {res['seconds']:9.1f}s  rss {res['rss_mib']:6.0f} MiB  (wall {time.perf_counter() - t0:.0f}s)"
          f"  {res.get('note', '')}", flush=True)
    return res


def max_diff(cells, values, lookup) -> float:
    return max((abs(v - lookup(c)) for c, v in zip(cells, values)), default=float("nan"))


def main(args) -> None:
    sections = args.sections.split(",")
    rows = [r for s in sections for r in SECTIONS[s]]
    if args.with_full:
        rows += [f"full_{s}" for s in ("resid", "head") if s in sections]
    print(f"{MODEL}: {args.pairs} IOI pairs, {args.threads} thread(s), max_rows {args.max_rows}; causal tracing "
          f"{args.ct_samples} samples, max_rows {args.ct_max_rows}; {args.repeats} interleaved repeats", flush=True)
    if "ct" in sections:
        setup = run_child(args, "ct_setup")
        if setup.get("failed"):
            rows = [r for r in rows if not r.startswith("ct_")]
        else:
            args.known_id, args.level = setup["known_id"], setup["level"]
            print(f"  fact: known_id {setup['known_id']} {setup['prompt']!r} -> {setup['answer']!r} (T={setup['T']}, "
                  f"{setup['n_known']} of {args.ct_facts} drawn facts known), noise level {setup['level']:.4f}",
                  flush=True)
    best: dict[str, dict] = {}
    paired: dict[str, list] = {}                             # row -> [(engine seconds, limit seconds)] per repeat
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
        for row in rows:
            res = run_child(args, row)
            if res.get("failed"):
                best.setdefault(row, res)
                continue
            if "limit_seconds" in res:
                paired.setdefault(row, []).append((res["seconds"], res["limit_seconds"]))
                print(f"  {'':<13} limit {res['limit_seconds']:9.1f}s, side by side: engine "
                      f"{res['seconds'] / res['limit_seconds']:.3f}x the limit  ({res['limit_note']})", flush=True)
            prev = best.get(row)
            if prev is None or prev.get("failed") or res["seconds"] < prev["seconds"]:
                res["rss_mib"] = max(res["rss_mib"], (prev or {}).get("rss_mib", 0))
                best[row] = res
            else:
                prev["rss_mib"] = max(prev["rss_mib"], res["rss_mib"])
    report(args, rows, best, paired)


def report(args, rows, best, paired) -> None:
    ok = lambda r: r in best and not best[r].get("failed")          # noqa: E731
    diffs, vs_ref, vs_lim = {}, {}, {}
    limit = {}                                               # section -> the median limit seconds measured
    for r, runs in paired.items():
        sec = "ct" if r.startswith("ct") else r.split("_")[1]
        limit.setdefault(sec, []).extend(lim for _, lim in runs)
        vs_lim[r] = sum(e / lim for e, lim in runs) / len(runs)     # engine rows: mean of side-by-side ratios
    limit = {sec: sorted(v)[len(v) // 2] for sec, v in limit.items()}
    for s in ("resid", "head"):
        eng, tl, full = f"engine_{s}", f"tl_{s}", f"full_{s}"
        if ok(eng) and ok(tl):
            mean = best[eng]["mean"]
            diffs[eng] = diffs[tl] = max_diff(best[tl]["cells"], best[tl]["values"], lambda c: mean[c[0]][c[1]])
        if ok(eng) and ok(full):
            diffs[full] = float((torch.tensor(best[full]["mean"]) - torch.tensor(best[eng]["mean"])).abs().max())
        for r in (eng, full, tl):
            if ok(r) and s in limit and r not in vs_lim:
                vs_lim[r] = best[r]["seconds"] / limit[s]
            if ok(r) and ok(tl) and r != tl:
                vs_ref[r] = best[tl]["seconds"] / best[r]["seconds"]
    if ok("ct_engine"):
        sc = best["ct_engine"]["scores"]
        look = lambda c: sc[c[0]][c[1]][c[2]]                        # noqa: E731
        for r in ("ct_loop", "ct_batched"):
            if ok(r):
                diffs[r] = max_diff(best[r]["cells"], best[r]["values"], look)
        diffs["ct_engine"] = diffs.get("ct_loop", float("nan"))
        for r in ("ct_engine", "ct_batched", "ct_loop"):
            if ok(r) and "ct" in limit and r not in vs_lim:
                vs_lim[r] = best[r]["seconds"] / limit["ct"]
            if ok(r) and ok("ct_loop") and r != "ct_loop":
                vs_ref[r] = best["ct_loop"]["seconds"] / best[r]["seconds"]
    floor = {r: best[r]["floor"] for r in ("engine_resid", "engine_head", "ct_engine") if ok(r) and "floor" in best[r]}
    print(f"\n{'row':<13} {'seconds':>10} {'vs limit':>9} {'vs floor':>9} {'TL|loop / row':>14} {'peak RSS MiB':>13} "
          f"{'max |diff|':>11}  note")
    for r in rows:
        if not ok(r):
            print(f"{r:<13} {'FAILED':>10}")
            continue
        b = best[r]
        lim = f"{vs_lim[r]:.3f}x" if r in vs_lim else "-"
        ref = f"{vs_ref[r]:.1f}x" if r in vs_ref else "-"
        d = f"{diffs[r]:.1e}" if r in diffs else "-"
        fl = f"{vs_lim[r] / floor[r]:.3f}x" if r in floor and r in vs_lim else "-"
        print(f"{r:<13} {b['seconds']:>10.1f} {lim:>9} {fl:>9} {ref:>14} {b['rss_mib']:>13.0f} {d:>11}  {b.get('note', '')}")
    for r, runs in paired.items():
        print(f"{r}: side-by-side ratios per repeat " + ", ".join(f"{e / lim:.3f}x ({e:.0f} s / {lim:.0f} s)"
                                                                  for e, lim in runs) + "; vs limit = their mean")
    print("other rows' vs limit: their seconds / the median limit of their section's side-by-side runs")
    print("\nmax |diff|: engine and tl rows, TL's metric on its sampled cells vs the engine's "
          "values[:, layer, cell].mean(0); full, vs the engine; ct rows, the sampled restorations vs the "
          "default engine's scores (ct_engine: vs the loop)")
    for r, f in floor.items():
        print(f"exact floor, {r}: {f:.3f} of the limit's token-layers (every row from its own first written "
              f"position and layer); vs floor = time / (floor x limit time)")
    checks = []
    for s in ("resid", "head"):
        e = f"engine_{s}"
        if e in vs_lim:
            checks.append((f"{s}: engine <= 0.15x limit", vs_lim[e] <= 0.15, f"{vs_lim[e]:.3f}x"))
        if e in vs_ref:
            checks.append((f"{s}: engine >= 20x faster than TL", vs_ref[e] >= 20, f"{vs_ref[e]:.1f}x"))
        if e in diffs:
            checks.append((f"{s}: TL == engine to 1e-4", diffs[e] <= 1e-4, f"{diffs[e]:.1e}"))
    if "ct_engine" in vs_ref:
        checks.append(("ct: engine >= 10x faster than the loop", vs_ref["ct_engine"] >= 10, f"{vs_ref['ct_engine']:.1f}x"))
    if "ct_engine" in vs_lim:
        checks.append(("ct: engine <= 0.3x its limit", vs_lim["ct_engine"] <= 0.3, f"{vs_lim['ct_engine']:.3f}x"))
    if "ct_loop" in diffs:
        checks.append(("ct: loop == engine to 1e-4", diffs["ct_loop"] <= 1e-4, f"{diffs['ct_loop']:.1e}"))
    for name, good, val in checks:
        print(f"{'PASS' if good else 'MISS'}  {name}: {val}")
    for r, f in floor.items():
        ref_row = {"engine_resid": "tl_resid", "engine_head": "tl_head", "ct_engine": "ct_loop"}[r]
        if ok(ref_row) and ref_row in vs_lim:
            print(f"bound {r}: at the limit's speed per token-layer no exact engine beats {vs_lim[ref_row] / f:.1f}x "
                  f"faster than {ref_row} or {f:.3f}x the limit")
        if "matmul_share" in best[r]:
            m = f * best[r]["matmul_share"]
            beats = (f" or more than {vs_lim[ref_row] / m:.1f}x faster than {ref_row}"
                     if ok(ref_row) and ref_row in vs_lim else "")
            print(f"hard bound {r}: the limit's matmuls at this machine's peak ({best[r]['peak_gflops']:.0f} GFLOP/s) "
                  f"are {best[r]['matmul_share']:.3f} of its time; with every non-matmul operation free no exact "
                  f"engine runs under {m:.3f}x the limit{beats}")


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 pairs, fewer samples, smaller batches")
    ap.add_argument("--sections", default="resid,head,ct")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=512, help="rows per forward (engine and limit)")
    ap.add_argument("--limit-batches", type=int, default=3,
                    help="limit batches timed between the engine's chunks (then scaled)")
    ap.add_argument("--ct-limit-batches", type=int, default=2,
                    help="causal tracing: limit forwards timed between the engine's chunks (then scaled)")
    ap.add_argument("--tl-samples", type=int, default=20, help="TL cells timed (then scaled)")
    ap.add_argument("--with-full", action="store_true", help="also time engine='full' (slow)")
    ap.add_argument("--ct-facts", type=int, default=64, help="known_1000 facts drawn to find a known one")
    ap.add_argument("--ct-samples", type=int, default=10, help="corrupted samples per fact")
    ap.add_argument("--ct-max-rows", type=int, default=1024)
    ap.add_argument("--ct-forwards", type=int, default=2, help="batched-engine forwards timed (then scaled)")
    ap.add_argument("--loop-samples", type=int, default=6, help="loop restorations timed per kind (then scaled)")
    ap.add_argument("--known-id", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--level", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick and not args.row:
        given = set(a.split("=")[0] for a in sys.argv[1:])
        for opt, v in (("--pairs", 8), ("--repeats", 1), ("--max-rows", 128), ("--limit-batches", 1),
                       ("--tl-samples", 4), ("--ct-samples", 2), ("--ct-max-rows", 128), ("--ct-forwards", 1), ("--ct-limit-batches", 1),
                       ("--loop-samples", 2), ("--ct-facts", 32)):
            if opt not in given:
                setattr(args, opt[2:].replace("-", "_"), v)
    return args


if __name__ == "__main__":
    a = parse()
    if a.row:
        out = ROWS[a.row](a)
        out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux; no children
        print("RESULT " + json.dumps(out), flush=True)
    else:
        main(a)
