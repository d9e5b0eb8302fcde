"""CLI bodies of ``interpkit physics train | probe`` and ``interpkit data --kind cfg|igsm``."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from interpkit.errors import UserError

PROBES = ("cfg", "igsm", "mistakes")


def physics_train_command(recipe: str, output_dir: str | None = None, steps: int | None = None,
                          seed: int | None = None, echo=print) -> dict:
    """Train one of the recipes (resumable) and print its held-out evaluation."""
    from interpkit.analyses.physics.recipes import run_recipe

    over = {k: v for k, v in {"steps": steps, "seed": seed}.items() if v is not None}
    ev = run_recipe(recipe, output_dir, **over)
    echo(f"{recipe}: {json.dumps(ev)} -> {output_dir or 'artifacts/models/' + recipe}")
    return ev


def _recipe(model: str) -> dict:
    path = Path(model) / "recipe.json"
    if not path.exists():
        raise UserError(f"{model} has no recipe.json; physics probes need a model trained by `interpkit physics train`")
    return json.loads(path.read_text())


def physics_probe_command(model: str, what: str, *, n: int = 300, random_baseline: bool = True,
                          targets: list[str] | None = None, root: str = "artifacts", echo=print) -> dict:
    """Probe a trained model: ``cfg`` (DP states), ``igsm`` (V-probes) or ``mistakes`` (part 2.2)."""
    from interpkit.analyses.physics.train import make_task
    from interpkit.models import load_model
    from interpkit.store import RunStore

    if what not in PROBES:
        raise UserError(f"unknown probe {what!r}; use one of {', '.join(PROBES)}")
    rec = _recipe(model)
    task_name, options = rec["config"].get("task"), rec["config"].get("task_options", {})
    if task_name not in ("cfg", "igsm"):
        raise UserError(f"{model} was not trained by `interpkit physics train` (its recipe has no cfg/igsm task)")
    if (what == "cfg") != (task_name == "cfg"):
        raise UserError(f"{model} was trained on {task_name}; the {what!r} probe needs a "
                        f"{'cfg' if what == 'cfg' else 'igsm'} model")
    task = make_task(task_name, options)
    lm = load_model(model)
    store = RunStore("physics", {"what": what, "n": n, "random_baseline": random_baseline, "targets": targets},
                     model=model, root=root)
    if what == "cfg":
        from interpkit.analyses.physics.cfg_probe import plot_cfg_probes, probe_cfg

        res = probe_cfg(lm, task.info["grammar"], n=n, random_baseline=random_baseline)
        res.to_dataframe().to_csv(store.dir / "cfg_probes.csv", index=False)
        plot_cfg_probes(res, store.dir / "cfg_probes.png", title=f"{Path(model).name}: DP-state probes")
        summary = {"unique_parse_frac": res.unique_frac, "n_strings": res.n_strings,
                   "trained": {t: res.trained.test_acc[i].tolist() for i, t in enumerate(res.trained.targets)},
                   "random": ({t: res.random.test_acc[i].tolist() for i, t in enumerate(res.random.targets)}
                              if res.random else None),
                   "chance": dict(zip(res.trained.targets, res.trained.chance.tolist())), "figure": "cfg_probes.png"}
        echo(res.table())
    elif what == "igsm":
        from interpkit.analyses.physics.igsm_probe import igsm_vprobes, plot_vprobes, rows_dicts, vprobe_table

        from interpkit.analyses.physics.igsm_probe import TARGETS

        bad = [t for t in targets or [] if t not in TARGETS]
        if bad:
            raise UserError(f"unknown V-probe target(s) {bad}; use {', '.join(TARGETS)}")
        rows = igsm_vprobes(lm, task.info["config"], targets or TARGETS, n=n, random_baseline=random_baseline)
        plot_vprobes({Path(model).name: rows}, store.dir / "vprobes.png", title=f"{Path(model).name}: V-probes")
        summary = {"vprobes": rows_dicts(rows), "figure": "vprobes.png"}
        echo(vprobe_table(rows))
    else:
        from interpkit.analyses.physics.igsm_probe import mistake_probe, plot_layers

        res = mistake_probe(lm, task.info["config"], n=n, random_baseline=random_baseline)
        curves = {"trained": res.trained.test_acc[0].tolist()}
        if res.random:
            curves["random init"] = res.random.test_acc[0].tolist()
        plot_layers(curves, float(res.trained.chance[0]), store.dir / "mistake_probe.png",
                    title=f"{Path(model).name}: 'this step is wrong' probe")
        summary = {"n_pairs": res.n_pairs, "trained": res.trained.test_acc[0].tolist(),
                   "random": res.random.test_acc[0].tolist() if res.random else None,
                   "chance": float(res.trained.chance[0]), "figure": "mistake_probe.png"}
        echo(f"'this step is wrong' probe, test accuracy by layer (0 = embeddings), {res.n_pairs} pairs:")
        echo("  trained: " + " ".join(f"{x:.3f}" for x in summary["trained"]))
        if res.random:
            echo("  random:  " + " ".join(f"{x:.3f}" for x in summary["random"]))
    (store.dir / "summary.json").write_text(json.dumps(summary, indent=1))
    store.finish(**{k: v for k, v in summary.items() if k in ("figure", "n_pairs", "unique_parse_frac")})
    echo(f"results: {store.dir}")
    return summary


def data_command(kind: str, out: str, n: int, seed: int, echo=print) -> Path:
    """Export CFG strings (with DP labels and the grammar) or iGSM problems as JSON lines."""
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    path = out_p / f"{kind}.jsonl"
    if kind == "cfg":
        from interpkit.tasks.cfg import CFGConfig, random_grammar, sample

        g = random_grammar(CFGConfig(seed=seed))
        (out_p / "grammar.txt").write_text(g.describe() + "\n")
        with path.open("w") as f:
            for s in sample(g, n, seed + 1):
                f.write(json.dumps({"text": " ".join(str(t + 1) for t in s.tokens), **asdict(s)}) + "\n")
    elif kind == "igsm":
        from interpkit.tasks.igsm import IGSMConfig, sample_problems

        with path.open("w") as f:
            for p in sample_problems(IGSMConfig(), n, seed):
                f.write(json.dumps({"text": p.text(), "answer": p.answer, "necessary": sorted(p.necessary),
                                    "names": p.names, "solution": p.solution}) + "\n")
    else:
        raise UserError(f"unknown data kind {kind!r}; use permutations, cfg or igsm")
    echo(f"{kind}: {n} examples -> {path}")
    return path
