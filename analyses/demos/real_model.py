"""The real-model part of `interpkit demo`: IOI and known facts on SmolLM2-135M-Instruct, offline.

Three results a reader can check against the literature, each in a few minutes on 2 CPU cores:
1. IOI residual patching by role x layer (denoising, clean into corrupted): the name information sits
   at S2 in early layers and at the final token in late layers; the *handover* is the first layer where
   patching the end position restores more than patching S2 (Wang et al. 2022's S2 -> end movement).
2. IOI heads: attribution patching ranks all 270 heads from one forward and backward; exact patching
   then confirms the top few (their layers swept exactly).
3. ROME causal tracing of a handful of known_1000 facts: hidden, MLP and attention restorations.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from interpkit.analyses.patching.attribution import run_attribution
from interpkit.analyses.patching.sweep import PatchConfig, plot_patching, role_effect, run_patching
from interpkit.errors import UserError
from interpkit.models import load_model
from interpkit.tasks import get_task

MODEL = "smollm2-135m"
ROLES = ["IO", "S1", "S1+1", "S2", "end"]


def handover_layer(layers: list[int], s2: torch.Tensor, end: torch.Tensor) -> int | None:
    """The first layer where restoring the end position matters more than restoring S2."""
    return next((l for l, a, b in zip(layers, s2.tolist(), end.tolist()) if b > a), None)


def ioi_residual(lm, n_pairs: int, out: Path, log) -> dict:
    prompts = get_task("ioi")(lm.tokenizer, n=n_pairs, seed=0)
    t = time.perf_counter()
    res = run_patching(lm, prompts, PatchConfig(site="resid_pre"))
    roles, matrix = role_effect(res, prompts, ROLES)
    s2, end = matrix[:, roles.index("S2")], matrix[:, roles.index("end")]
    figure = plot_patching(res, roles, out / "ioi_resid_by_role.png", matrix=matrix,
                           title=f"{MODEL}: IOI residual patching by role (denoise)")
    log(f"  IOI resid_pre sweep: {len(prompts)} pairs x {len(res.layers)} layers x {len(res.cells)} positions in "
        f"{time.perf_counter() - t:.0f}s ({res.timings['skipped']:.0%} of cells skipped as provably unchanged)")
    return {"pairs": len(prompts), "roles": roles, "layers": res.layers,
            "s2": [round(float(x), 3) for x in s2], "end": [round(float(x), 3) for x in end],
            "handover_layer": handover_layer(res.layers, s2, end),
            "logit_diff_clean": float(res.source.mean()), "logit_diff_corrupt": float(res.base.mean()),
            "clean_correct": float((res.source > 0).float().mean()), "figure": figure,
            "seconds": round(time.perf_counter() - t, 1)}


def ioi_heads(lm, n_pairs: int, top: int, out: Path, log) -> dict:
    """Attribution patching over all heads, then exact patching of the layers holding the top ``top``."""
    prompts = get_task("ioi")(lm.tokenizer, n=n_pairs, seed=1)
    t = time.perf_counter()
    cfg = PatchConfig(site="head_out", by="head", max_rows=64)
    att = run_attribution(lm, prompts, cfg)
    eff = att.effect()
    order = eff.abs().flatten().argsort(descending=True)[:top].tolist()
    heads = [(att.layers[i // eff.shape[1]], i % eff.shape[1]) for i in order]
    exact = run_patching(lm, prompts, PatchConfig(site="head_out", by="head", layers=sorted({l for l, _ in heads})))
    ex = exact.effect()
    rows = [{"layer": l, "head": h, "attribution": round(float(eff[att.layers.index(l), h]), 4),
             "exact": round(float(ex[exact.layers.index(l), h]), 4)} for l, h in heads]
    best = ex.abs().flatten().argmax().item()
    exact_best = {"layer": exact.layers[best // ex.shape[1]], "head": best % ex.shape[1],
                  "effect": round(float(ex.flatten()[best]), 4)}
    agree = sum((r["attribution"] > 0) == (r["exact"] > 0) for r in rows) / max(len(rows), 1)
    plot_patching(att, [f"H{h}" for h in range(eff.shape[1])], out / "ioi_heads_attribution.png",
                  title=f"{MODEL}: IOI heads, attribution patching (denoise)")
    log(f"  IOI heads: attribution over {eff.numel()} heads, exact on {len(exact.layers)} layers, "
        f"{time.perf_counter() - t:.0f}s")
    return {"pairs": len(prompts), "top": rows, "exact_layers": exact.layers, "exact_best": exact_best,
            "sign_agreement": agree, "seconds": round(time.perf_counter() - t, 1)}


def facts(n_facts: int, samples: int, out: Path, log) -> dict:
    from interpkit.analyses.causal_tracing.command import causal_trace_command

    t = time.perf_counter()
    result = causal_trace_command(MODEL, facts=n_facts, kind="all", samples=samples, root=str(out / "runs"),
                                  echo=lambda line: log("  " + line) if line.startswith(("traced", "known")) else None)
    agg = result.aggregate()
    summary = result.summary()
    peak = {}
    for kind in result.kinds:
        last_subject = agg["aie"][result.kinds.index(kind)][2]            # [layers] at the last subject token
        last_token = agg["aie"][result.kinds.index(kind)][5]
        peak[kind] = {"last_subject_peak_layer": int(last_subject.argmax()),
                      "last_subject_peak_aie": round(float(last_subject.max()), 4),
                      "last_token_peak_layer": int(last_token.argmax()),
                      "last_token_peak_aie": round(float(last_token.max()), 4)}
    return {"facts": ["".join(f.tokens).replace("Ġ", " ") for f in result.facts], "ate": round(summary["ate"], 4), "peaks": peak,
            "figures": summary.get("figures", []), "seconds": round(time.perf_counter() - t, 1)}


def run_real_demo(out: str | Path, *, quick: bool = False, log=print) -> dict | None:
    """The real-model results (see the module docstring); None when the model is not installed."""
    out = Path(out) / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    try:
        lm = load_model(MODEL)
    except UserError as e:
        log(f"real-model part skipped: {e}")
        return None
    t0 = time.perf_counter()
    log(f"{MODEL}: {lm.arch.n_layers} layers, d={lm.arch.d_model}, {lm.arch.n_heads} heads "
        f"({lm.arch.n_kv_heads} KV heads)")
    summary = {"model": MODEL, "ioi": ioi_residual(lm, 8 if quick else 12, out, log),
               "heads": ioi_heads(lm, 4 if quick else 6, 3, out, log),
               "causal_tracing": facts(1 if quick else 2, 2 if quick else 3, out, log)}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["out"] = str(out)
    return summary


def print_real(summary: dict | None, echo=print) -> None:
    if not summary:
        return
    ioi, heads, ct = summary["ioi"], summary["heads"], summary["causal_tracing"]
    echo(f"{summary['model']} (real pretrained LM, offline):")
    echo(f"  IOI: clean logit diff {ioi['logit_diff_clean']:.2f} ({ioi['clean_correct']:.0%} of {ioi['pairs']} "
         f"prompts correct), corrupted {ioi['logit_diff_corrupt']:.2f}")
    step = max(1, len(ioi["layers"]) // 10)
    echo("  layer " + "".join(f"{l:>6}" for l in ioi["layers"][::step]))
    echo("  S2    " + "".join(f"{x:>6.2f}" for x in ioi["s2"][::step]))
    echo("  end   " + "".join(f"{x:>6.2f}" for x in ioi["end"][::step]))
    echo(f"  S2 -> end handover at layer {ioi['handover_layer']}")
    echo("  top heads by attribution (exact patching beside): "
         + ", ".join(f"L{r['layer']}H{r['head']} {r['attribution']:+.2f} ({r['exact']:+.2f})" for r in heads["top"]))
    echo(f"  causal tracing of {len(ct['facts'])} known facts: ATE {ct['ate']:.3f}; peak AIE at the last subject "
         "token: " + ", ".join(f"{k} L{v['last_subject_peak_layer']} {v['last_subject_peak_aie']:.3f}"
                               for k, v in ct["peaks"].items()))
    echo(f"  {summary['seconds']:.0f}s; figures and summary.json in {summary['out']}/")
