"""Where does a small model trained here recall facts? Causal tracing on synthetic facts.

    python bench/synthetic_facts_finding.py                 # trace the shipped model
    python bench/synthetic_facts_finding.py --train         # retrain it (about 2 min on 1 CPU thread), then trace
    python bench/synthetic_facts_finding.py --compare       # also train a query-only model (not saved) and trace it

The model (GPT-2 architecture, 4 layers, d_model 64) is trained on ``tasks.synthetic_facts``: 150 invented
subjects of 2-4 syllable tokens, 4 relations each, queries "<subject> lives in the city of" -> attribute
plus, by default, bios "<subject> attr attr attr attr" in random orders. The script prints the AIE of
each restoration kind per token group and layer (window 2: with 4 layers ROME's window of 10 would
restore every layer) and ROME's question: does restoring the last subject token's early hidden states
bring the answer back, i.e. is there an early site at the subject as well as a late one at the last token?
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interpkit.analyses.causal_tracing import command as CC  # noqa: E402
from interpkit.analyses.causal_tracing import facts as F  # noqa: E402
from interpkit.analyses.causal_tracing import trace as CT  # noqa: E402
from interpkit.tasks import synthetic_facts as SF  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "artifacts" / "models" / "synthetic-facts-gpt2"
TRAIN = dict(family="gpt2", n_layers=4, d_model=64, n_heads=4, steps=1000, batch=64, lr=3e-3, seed=0)


def train(bios: bool, out: Path | None):
    facts = SF.make_facts()
    t0 = time.perf_counter()
    hf, tok, acc = SF.train_fact_model(facts, bios=bios, **TRAIN)
    secs = time.perf_counter() - t0
    print(f"trained ({'queries + bios' if bios else 'queries only'}): recall {acc:.3f} in {secs:.0f}s")
    if out is not None:
        hf.save_pretrained(out)
        tok.save_pretrained(out)
        info = {"command": "python bench/synthetic_facts_finding.py --train", "train": {**TRAIN, "bios": bios},
                "facts": {"n_subjects": 150, "seed": 0, "n_facts": len(facts)}, "recall": acc,
                "train_seconds": round(secs, 1), "torch_threads": torch.get_num_threads()}
        (out / "train_info.json").write_text(json.dumps(info, indent=2))
    return hf, tok


def loaded(hf, tok, name: str):
    from nnsight import TransformersModel

    from interpkit.arch import Arch
    from interpkit.families import FAMILIES
    from interpkit.models import LoadedModel

    fam = FAMILIES["gpt2"]
    return LoadedModel(name, TransformersModel(hf, tokenizer=tok, rename=fam.rename), Arch.from_hf(hf, fam), tok)


def trace(lm, n_facts: int, figures: Path | None):
    from interpkit.tasks.known_facts import filter_known

    prompts = SF.prompt_set(lm.tokenizer, SF.make_facts())
    std, top1 = CT.dataset_pass(lm, prompts)
    known = filter_known(prompts, top1)
    chosen = known.subset(list(range(min(n_facts, len(known)))))
    cfg = CT.TraceConfig(window=2, severed=True)
    t0 = time.perf_counter()
    res = CT.run_causal_tracing(lm, chosen, cfg, subject_std=std)
    print(f"known {len(known)}/{len(prompts)} facts; traced {len(chosen)} in {time.perf_counter() - t0:.1f}s")
    agg = res.aggregate()
    print(CC.format_summary(res.summary(), len(prompts), len(chosen)))
    L = agg["aie"].shape[-1]
    for k, kind in enumerate(res.kinds):
        print(f"\nAIE, {kind} (rows: token groups, columns: layers 0..{L - 1}; +- = 95% half-width)")
        for g, group in enumerate(CT.GROUPS):
            mid, half = agg["aie"][k, g], agg["aie_hi"][k, g] - agg["aie"][k, g]
            cells = [f"{mid[l]:6.3f}+-{half[l]:.3f}" for l in range(L)]
            print(f"  {F.GROUP_LABELS[group]:<24}" + "  ".join(cells))
    h = res.kinds.index("hidden")
    ls, lt = CT.GROUPS.index("last_subject"), CT.GROUPS.index("last")
    print(f"\nhidden AIE at layer 0: last subject token {agg['aie'][h, ls, 0]:.3f} vs last token "
          f"{agg['aie'][h, lt, 0]:.3f}; ATE {float(agg['ate']):.3f}")
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        print("figures:", *[str(p) for p in res.plot(figures)])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="retrain and overwrite the shipped model")
    ap.add_argument("--compare", action="store_true", help="also trace a model trained on queries only")
    ap.add_argument("--facts", type=int, default=60)
    ap.add_argument("--figures", type=Path, default=None, help="write heatmap / line figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.train or not OUT.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        hf, tok = train(True, OUT)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf, tok = AutoModelForCausalLM.from_pretrained(OUT).eval(), AutoTokenizer.from_pretrained(OUT)
    print("\n=== queries + bios (shipped model) ===")
    trace(loaded(hf.eval(), tok, "synthetic-facts-gpt2"), args.facts, args.figures)
    if args.compare:
        print("\n=== queries only ===")
        hf2, tok2 = train(False, None)
        trace(loaded(hf2.eval(), tok2, "synthetic-facts-queries-only"), args.facts,
              None if args.figures is None else args.figures / "queries_only")


if __name__ == "__main__":
    main()
