"""The recipes of the shipped Physics-of-LMs models, and ``python -m analyses.physics.recipes NAME``.

Each recipe trains (resumably) into ``artifacts/models/<name>``, evaluates the model on fresh data and
exports it with a recipe.json. Sizes and lengths are cut down from the papers to train in about five
minutes on one CPU thread (see the README section for what was shortened).
"""
from __future__ import annotations

from pathlib import Path

from interpkit.analyses.physics.train import PhysicsTrainConfig, finish_model, train

MODELS = Path(__file__).resolve().parents[2] / "artifacts" / "models"

RECIPES: dict[str, dict] = {
    # Part 1: root + 3 NT levels of 3 NTs, 2-3 rules of length 2-3 (strings of 16-81 terminals)
    "cfg-demo": dict(task="cfg", task_options={"levels": [1, 3, 3, 3], "seed": 0}, n_layers=4, d_model=64,
                     n_heads=8, max_positions=96, steps=1500, batch_size=32, lr=3e-3, warmup_steps=100),
    # Part 2.1: deep vs wide at the same number of block parameters (4 x 48^2 = 1 x 96^2); 6 quantities
    "igsm-deep": dict(task="igsm", task_options={"n_vars": 6, "n_leaves": 2}, n_layers=4, d_model=48, n_heads=6,
                      max_positions=128, steps=1000, batch_size=32, lr=3e-3, warmup_steps=100),
    "igsm-wide": dict(task="igsm", task_options={"n_vars": 6, "n_leaves": 2}, n_layers=1, d_model=96, n_heads=12,
                      max_positions=128, steps=1000, batch_size=32, lr=3e-3, warmup_steps=100),
}


def recipe_config(name: str, output_dir: str | Path | None = None, **overrides) -> PhysicsTrainConfig:
    from interpkit.errors import UserError

    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
    out = str(output_dir or MODELS / name)
    return PhysicsTrainConfig(**{**RECIPES[name], "output_dir": out, **overrides})


def run_recipe(name: str, output_dir: str | Path | None = None, *, progress: bool = True,
               stop_at: int | None = None, **overrides) -> dict:
    """Train (resuming), evaluate on fresh data, export model + recipe.json; returns the evaluation.

    ``stop_at`` ends training at that step (the schedule is still the one of ``steps``), as the shipped
    models were when CPU time ran out; the recipe records it, so the same call reproduces them."""
    cfg = recipe_config(name, output_dir, progress=progress, **overrides)
    model, tok, history, wall, step = train(cfg, stop_at=stop_at)
    from interpkit.analyses.physics.evaluate import evaluate_model

    ev = evaluate_model(cfg, model, tok)
    finish_model(cfg, model, tok, step, wall, history, {"eval": ev, "recipe": name, "stop_at": stop_at},
                 command=f"python -m analyses.physics.recipes {name}" + (f" --stop-at {stop_at}" if stop_at else ""))
    return ev


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Train, evaluate and export Physics-of-LMs recipes.")
    ap.add_argument("names", nargs="+", choices=list(RECIPES))
    ap.add_argument("--stop-at", type=int, default=None)
    args = ap.parse_args()
    for arg in args.names:
        print(arg, run_recipe(arg, progress=False, stop_at=args.stop_at), flush=True)
