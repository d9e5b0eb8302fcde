"""Causal tracing of one fact, every (kind, token, layer) restoration: each engine vs its limit vs the loop.

    python bench/bench_causal_tracing.py [--reps 3] [--models synthetic,tiny-llama,gpt2-6x256]

* prefix:  ``analyses.causal_tracing.trace`` with its default engine (``analyses.causal_tracing.prefix``: one reference
           forward, then per chunk only the tokens and layers a restoration can change);
* prefix limit: the plain HF forwards that engine needs (the reference forward with its cache, then each
           chunk's suffix on the cached prefix with the skipped layers replaced by their input; no
           nnsight, no writes);
* batched: ``engine="batched"`` (every restoration as batch rows of full forwards) and its limit, the
           plain HF forwards with the same rows;
* loop:    ROME's procedure with plain forward hooks, one forward of 1 + S rows per restoration
           (severed runs: two, as in ROME's notebook), ``tests/references/causal_tracing_ref.py``.

Times are the minimum over ``--reps`` interleaved repetitions (the machine is shared). Targets: the
engine <= 1.5x its limit and >= 5x faster than the loop.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interpkit.analyses.causal_tracing import trace as CT  # noqa: E402
from tests.references.causal_tracing_ref import ReferenceTracer  # noqa: E402

SYNTHETIC = ROOT / "artifacts" / "models" / "synthetic-facts-gpt2"


def _wrap(hf, tok, name):
    from nnsight import TransformersModel

    from interpkit.arch import Arch
    from interpkit.families import family_for
    from interpkit.models import LoadedModel

    fam = family_for(hf.config.model_type)
    return LoadedModel(name, TransformersModel(hf, tokenizer=tok, rename=fam.rename), Arch.from_hf(hf, fam), tok)


def model_and_fact(name: str):
    """(LoadedModel, Fact) for a bench model; facts come from tasks.synthetic_facts (word-level tokens)."""
    from transformers import AutoModelForCausalLM

    from interpkit.models import tiny_config
    from interpkit.tasks import synthetic_facts as SF

    tok = SF.build_tokenizer()
    if name == "synthetic":
        hf = AutoModelForCausalLM.from_pretrained(SYNTHETIC)
    else:
        family, size = {"tiny-llama": ("llama", (3, 64)), "tiny-gpt2": ("gpt2", (3, 64)),
                        "gpt2-6x256": ("gpt2", (6, 256))}[name]
        cfg = tiny_config(family, len(tok), n_layers=size[0], d_model=size[1])
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    hf.eval().requires_grad_(False)
    facts = SF.make_facts()
    fact = next(f for f in facts if len(f.subject) == 3 and f.relation == "city")   # 10 tokens with BOS
    ps = SF.prompt_set(tok, [fact])
    return _wrap(hf, tok, name), CT.facts_of(ps)[0]


def time_min(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def prefix_limit_fn(lm, fact, cfg, level):
    """The plain forwards the prefix engine runs for ``fact`` (inputs prepared once, outside the timing)."""
    from interpkit.analyses.causal_tracing import prefix as CP
    from interpkit.engine.inside import apply_write, fill_write
    from interpkit.engine.plan import ForwardCost
    from interpkit.kv_cache import layer_kv, positions, prefix_cache
    from tests.references.causal_tracing_ref import hf_blocks

    L, S = lm.arch.n_layers, cfg.samples
    rest = CT.grid(cfg.all_kinds(), len(fact.ids), L)
    shape = CP.FactShape(len(fact.ids), fact.subject_first, L, cfg.window, S, cfg.max_rows,
                         cost=ForwardCost.for_model(lm.arch))
    plan = CP.plan_fact(rest, shape)
    job = CP.FactJob(fact, CT.fact_noise(cfg, fact, lm.arch.d_model, level), rest, torch.tensor([-1]))
    sweep = CP.fact_sweep(job, plan, S, L)
    x = fact.ids[None].expand(S + 1, -1)
    with torch.no_grad():
        out = lm.hf(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, output_hidden_states=True)
    kv = [layer_kv(out.past_key_values, layer) for layer in range(L)]
    # start states only need the residual stream: every record stands in with its layer's residual
    acts = [out.hidden_states[1 + layer] for _, layer in sweep.base.records]
    mask = sweep.base.inputs["attention_mask"]
    args = []
    for c in sweep.chunks:                       # what the engine's run_chunk prepares, without nnsight
        start = acts[c.start][c.rows, c.p0:].clone() if c.l0 > 0 else None
        for w in c.writes:
            if w.layer < c.l0:
                apply_write(start, fill_write(w, acts, c.p0))
        args.append({"inputs": {"input_ids": sweep.base.inputs["input_ids"][c.rows, c.p0:],
                                "attention_mask": mask[c.rows], "position_ids": positions(mask)[c.rows, c.p0:]},
                     "l0": c.l0, "start": start})
    blocks = hf_blocks(lm.hf)

    def limit():
        with torch.no_grad():
            lm.hf(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, output_hidden_states=True,
                  logits_to_keep=1)
            for c, a in zip(plan.chunks, args):
                n = a["inputs"]["input_ids"].shape[0]
                cache = prefix_cache(None, kv, c.p0, torch.arange(1, S + 1).repeat(n // S)) if c.p0 else None
                saved = [blocks[layer].forward for layer in range(a["l0"])]   # (nnsight's own wrapper)
                for layer in range(a["l0"]):
                    blocks[layer].forward = lambda *args_, start=a["start"], **kw: start
                try:
                    lm.hf(**a["inputs"], past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
                finally:
                    for layer, fwd in enumerate(saved):
                        blocks[layer].forward = fwd

    return limit, plan


def bench(name: str, kinds: list[str], reps: int) -> dict:
    lm, fact = model_and_fact(name)
    base = dict(kinds=[k for k in kinds if k in CT.BASE_KINDS], severed="severed_mlp" in kinds)
    cfg, cfg_b = CT.TraceConfig(**base), CT.TraceConfig(**base, engine="batched")
    level = 0.1
    L, T = lm.arch.n_layers, len(fact.ids)
    rest = CT.grid(cfg.all_kinds(), T, L)
    rows = [1 + cfg.samples * (1 + len(p)) for p in CT.split_restorations(rest, cfg.samples, cfg.max_rows)]
    prefix_limit, plan = prefix_limit_fn(lm, fact, cfg, level)

    def prefix():
        CT.trace_facts(lm, [fact], cfg, level)

    def batched():
        CT.trace_facts(lm, [fact], cfg_b, level)

    def batched_limit():
        with torch.no_grad():
            for b in rows:
                x = fact.ids[None].expand(b, -1)
                lm.hf(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1)

    noise = CT.fact_noise(cfg, fact, lm.arch.d_model, level)

    def loop():
        ref = ReferenceTracer(lm.hf, fact.ids, (fact.subject_first, fact.subject_last), noise)
        ref.high_low()
        ref.table(cfg.all_kinds(), cfg.window)

    fns = {"prefix": prefix, "prefix_limit": prefix_limit, "batched": batched, "batched_limit": batched_limit}
    for fn in fns.values():                                 # warm-up (parse caches, allocator)
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):                                   # interleave, keep the best of each
        for k, fn in fns.items():
            best[k] = min(best[k], time_min(fn, 1))
    best["loop"] = time_min(loop, max(1, reps // 2))
    n_loop = len(rest) + sum(1 for r in rest if r[0].startswith("severed")) + 1
    work = sum(len(c.items) * cfg.samples * (T - c.p0) * (L - c.l0) for c in plan.chunks)
    return {"model": name, "kinds": "+".join(cfg.all_kinds()), "T": T, "L": L, "restorations": len(rest),
            "unique": len(plan.unique), "chunks": len(plan.chunks), "work": work / (len(rest) * cfg.samples * T * L),
            "forwards": len(rows), "rows": sum(rows), "loop_forwards": n_loop, **{f"{k}_s": v for k, v in best.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default="synthetic,tiny-llama,gpt2-6x256")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in args.models.split(","):
        for kinds in (list(CT.BASE_KINDS), list(CT.BASE_KINDS) + list(CT.SEVERED_KINDS)):
            results.append(bench(name, kinds, args.reps))
            r = results[-1]
            print(f"{r['model']:<11} {r['kinds']:<40} T={r['T']} L={r['L']} restorations={r['restorations']} "
                  f"(unique {r['unique']}, {r['chunks']} chunks, {r['work']:.2f} of the token-layers): "
                  f"prefix {r['prefix_s']:.3f}s (limit {r['prefix_limit_s']:.3f}s), batched {r['batched_s']:.3f}s "
                  f"in {r['forwards']} forwards (limit {r['batched_limit_s']:.3f}s), "
                  f"loop {r['loop_s']:.3f}s in {r['loop_forwards']} forwards", flush=True)
    print(f"\n{'model':<11} {'kinds':<40} {'prefix s':>9} {'limit s':>8} {'batched s':>10} {'limit s':>8} "
          f"{'loop s':>7} {'prefix/limit':>13} {'loop/prefix':>12} {'batched/limit':>14} {'loop/batched':>13}")
    for r in results:
        print(f"{r['model']:<11} {r['kinds']:<40} {r['prefix_s']:>9.3f} {r['prefix_limit_s']:>8.3f} "
              f"{r['batched_s']:>10.3f} {r['batched_limit_s']:>8.3f} {r['loop_s']:>7.3f} "
              f"{r['prefix_s'] / r['prefix_limit_s']:>12.2f}x {r['loop_s'] / r['prefix_s']:>11.1f}x "
              f"{r['batched_s'] / r['batched_limit_s']:>13.2f}x {r['loop_s'] / r['batched_s']:>12.1f}x")
    print("targets: engine (prefix, the default) <= 1.5x its limit and >= 5x faster than the loop")


if __name__ == "__main__":
    main()
