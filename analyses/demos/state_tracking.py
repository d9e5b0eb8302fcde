"""`interpkit demo`: the whole toolkit, offline, on a small S3 model that really tracks state.

Loads the shipped checkpoint (``artifacts/models/s3-demo``; retrains it with its recipe when missing or
asked to), then evaluates length generalisation, probes state and parity at every layer, runs the
parity-pair prefix-patching sweeps, states the AA/PAA verdict, and writes figures and
``artifacts/demo/summary.json``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from interpkit.analyses.state_tracking.signature import measure_signature
from interpkit.models import load_model
from interpkit.plots import finish, pyplot
from interpkit.analyses.state_tracking.training import TrainConfig, evaluate_length_generalization, plot_accuracy, train

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "artifacts" / "models" / "s3-demo"


def ensure_model(model_dir: Path, retrain: bool, log, recipe_dir: Path = SHIPPED) -> tuple[Path, dict]:
    """The demo checkpoint, trained from its recipe if it is missing (or ``retrain``)."""
    recipe = json.loads((recipe_dir / "recipe.json").read_text())
    if retrain or not (model_dir / "model.safetensors").exists():
        cfg = TrainConfig.from_dict({**recipe["config"], "output_dir": str(model_dir), "progress": False})
        log(f"training the S3 demo model ({cfg.n_layers} layers, d={cfg.d_model}) with seed {cfg.seed} ...")
        train(cfg, resume=True)
        recipe = json.loads((model_dir / "recipe.json").read_text())
    return model_dir, recipe


def run_demo(out: str | Path = "artifacts/demo", *, retrain: bool = False, n_probe: int = 400,
             n_pairs: int = 64, shipped: Path = SHIPPED, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model_dir, recipe = ensure_model(out / "model" if retrain else shipped, retrain, log, recipe_dir=shipped)
    timings["model_s"] = time.perf_counter() - t0
    lm = load_model(str(model_dir))
    cfg = recipe["config"]
    n, T = cfg["n"], cfg["train_len"]

    t = time.perf_counter()
    ev = evaluate_length_generalization(lm.hf, lm.tokenizer, n=n, train_len=T, factor=2, n_stories=1000, seed=4242)
    plot_accuracy(ev, out / "accuracy_vs_length.png", title=f"S{n} demo model: accuracy vs position")
    timings["eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run = measure_signature(lm, n, T, n_probe=n_probe, n_pairs=n_pairs)
    probes, sweeps, boundaries, sig = run.probes, run.sweeps, run.boundaries, run.signature
    probes.plot(out / "probe_accuracy.png", title=f"S{n} demo model: linear probes (held-out prompts)")
    for kind, res in sweeps.items():
        _heatmap(res.effect(clip=True), res.layers, res.cells, out / f"prefix_patching_{kind}_parity.png",
                 f"prefix patching, {kind}-parity first action (clipped NLD)")
    timings["probe_patching_s"] = time.perf_counter() - t

    i_state, i_parity = probes.targets.index("state"), probes.targets.index("parity")
    timings["total_s"] = time.perf_counter() - t0
    summary = {
        "model": {"path": str(model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir),
                  "layers": lm.arch.n_layers, "d_model": lm.arch.d_model, "train_len": T, "group": f"S{n}",
                  "trained_steps": recipe.get("steps_run"), "train_wall_s": recipe.get("wall_s")},
        "accuracy": {"state_at_train_len": ev["min_state_acc_in_train_len"],
                     "state_mean_within_train_len": sum(ev["state_acc"][:T]) / T,
                     "state_at_2x": ev["state_acc"][-1], "parity_at_2x": ev["parity_acc"][-1],
                     "state_mean_beyond_train_len": ev["mean_state_acc_beyond"],
                     "state_cutoff_0.98": ev["state_cutoff"], "parity_cutoff_0.98": ev["parity_cutoff"]},
        "probes": {"layers": probes.layers, "state_test_acc": [round(float(a), 4) for a in probes.test_acc[i_state]],
                   "parity_test_acc": [round(float(a), 4) for a in probes.test_acc[i_parity]],
                   "state_chance": float(probes.chance[i_state]), "parity_chance": float(probes.chance[i_parity])},
        "patching": {"site": "resid_post", "region": "prefix", "pairs_per_group": n_pairs,
                     "boundary_same_parity": boundaries["same"], "boundary_diff_parity": boundaries["diff"],
                     "forwards": sum(r.timings["forwards"] for r in sweeps.values())},
        "verdict": {k: v for k, v in asdict(sig).items() if not k.startswith("boundary")},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "figures": sorted(p.name for p in out.glob("*.png")),
        "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _heatmap(effect: torch.Tensor, layers: list[int], cells: list[int], path: Path, title: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 3))
    im = ax.imshow(effect.numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel("last patched position (prefix 0..t)")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xticks(range(len(cells)), cells, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    finish(fig, path)


def print_table(summary: dict, echo=print) -> None:
    a, p, v = summary["accuracy"], summary["probes"], summary["verdict"]
    echo(f"S3 demo model: {summary['model']['layers']} layers, d={summary['model']['d_model']}, "
         f"trained at length {summary['model']['train_len']}")
    echo(f"  state accuracy at training length (min over positions): {a['state_at_train_len']:.4f}")
    echo(f"  state accuracy at 2x length (last position):           {a['state_at_2x']:.4f}")
    echo(f"  {'layer':<7}" + "".join(f"{l:>7}" for l in p["layers"]))
    echo(f"  {'state':<7}" + "".join(f"{x:>7.3f}" for x in p["state_test_acc"]))
    echo(f"  {'parity':<7}" + "".join(f"{x:>7.3f}" for x in p["parity_test_acc"]))
    echo(f"  prefix boundary by layer: same parity {summary['patching']['boundary_same_parity']}, "
         f"diff parity {summary['patching']['boundary_diff_parity']}")
    echo(f"  verdict: {v['verdict']} ({v['strength']}): {v['reason']}")
    echo(f"  total {summary['timings_s']['total_s']:.1f}s; figures and summary.json in {summary['out']}/")
