"""How much work causal tracing's prefix engine plans, against the least any exact engine can do.

    python bench/bench_ct_plan_work.py [--facts 60] [--samples 10]

No forward runs: for the first ``--facts`` known_1000 prompts tokenized for smollm2-135m (30 layers), every
(kind, token, layer) restoration of ``--kind all --severed`` is planned with ``plan_fact`` and its work
counted in token-layers (rows x positions recomputed x layers recomputed). "minimal" gives every distinct
restoration its own forward from its first written position and layer (zero waste, one forward each);
"full" is the batched engine's whole prompts through every layer. Printed per grouping (the engine's
cost model for smollm2's layer size, the default; zero fixed costs: one forward per distinct start; a
huge fixed cost: as few forwards as ``max_rows`` allows): the planned work as a ratio to the minimal
and to the full work, forwards per fact, and the cost model's estimate (token-layers plus fixed costs)
relative to the default's. One smollm2
token-layer is ~7 MFLOP; the 2-core CPU here runs a plain batched HF forward at ~400 tokens/s (~90
GFLOP/s, its fp32 matmul peak being ~98), i.e. ~0.083 ms per token-layer (``--ms-per-token-layer``), which
turns the minimal work into the floor on wall time printed at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interpkit.analyses.causal_tracing.trace import SEVERED_KINDS, BASE_KINDS, facts_of, grid  # noqa: E402
from interpkit.analyses.causal_tracing.prefix import FactShape, first_layer, plan_fact  # noqa: E402
from interpkit.engine.plan import ForwardCost  # noqa: E402

SMOLLM2_LAYER = 3_540_096          # parameters of one smollm2-135m layer (the norms included)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=60, help="known_1000 prompts planned")
    ap.add_argument("--samples", type=int, default=10, help="corrupted samples per fact")
    ap.add_argument("--window", type=int, default=10, help="layers per mlp / attn window")
    ap.add_argument("--ms-per-token-layer", type=float, default=0.083, help="the floor's rate (2 threads)")
    args = ap.parse_args()

    from interpkit.gguf import converted_dir, resolve_builtin
    from interpkit.tasks.known_facts import build
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted_dir(resolve_builtin("smollm2-135m")))
    ps = build(tok)
    facts = facts_of(ps.subset(list(range(args.facts))))
    L, S = 30, args.samples
    kinds = list(BASE_KINDS + SEVERED_KINDS)
    minimal = full = 0
    rows = []
    model = ForwardCost.for_layer(SMOLLM2_LAYER)
    estimates = {}
    for name, cost in [("cost model", model), ("exact starts", ForwardCost(0, 0)), ("fewest", ForwardCost(1e12, 0))]:
        work = forwards = 0
        minimal = full = 0
        for f in facts:
            T = len(f.ids)
            plan = plan_fact(grid(kinds, T, L), FactShape(T, f.subject_first, L, args.window, S, 1024, cost=cost))
            work += sum(len(c.items) * S * (T - c.p0) * (L - c.l0) for c in plan.chunks)
            minimal += sum(S * (T - min(x[2] for x in w)) * (L - first_layer(w)) for w in plan.unique)
            full += len(kinds) * T * L * S * T * L
            forwards += 1 + len(plan.chunks)
            estimates[name] = estimates.get(name, 0) + sum(
                model.of(len(c.items) * S, T - c.p0, L - c.l0) for c in plan.chunks)
        rows.append((name, work / minimal, work / full, forwards / len(facts), estimates[name] / estimates["cost model"]))
    n = len(facts)
    print(f"{n} facts, mean {sum(len(f.ids) for f in facts) / n:.1f} tokens, {S} samples, kinds {','.join(kinds)}")
    print(f"{'grouping':>12} {'work/minimal':>13} {'work/full':>10} {'forwards/fact':>14} {'estimate':>9}")
    for name, to_min, to_full, fw, est in rows:
        print(f"{name:>12} {to_min:>13.3f} {to_full:>10.4f} {fw:>14.1f} {est:>9.3f}")
    per_fact_s = minimal / n * args.ms_per_token_layer / 1000
    print(f"minimal work per fact: {minimal / n / 1e6:.2f} M token-layers = {per_fact_s:.0f} s at "
          f"{args.ms_per_token_layer} ms per token-layer; 50 facts >= {50 * per_fact_s / 60:.0f} min")


if __name__ == "__main__":
    main()
