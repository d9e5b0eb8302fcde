"""``interpkit physics``: train the Physics-of-LMs models and probe them (registered in cli.py)."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Physics of LMs (Allen-Zhu & Li): synthetic CFG / iGSM models, DP-state and V-probes.")


@app.command()
def train(recipe: str = typer.Option(..., help="cfg-demo | igsm-deep | igsm-wide"),
          output_dir: str = typer.Option(None, help="Default artifacts/models/<recipe>."),
          steps: int = typer.Option(None), seed: int = typer.Option(None)) -> None:
    """Train a recipe from scratch (resumes from its last checkpoint), evaluate it, export with recipe.json."""
    from interpkit.analyses.physics.command import physics_train_command

    physics_train_command(recipe, output_dir, steps=steps, seed=seed, echo=typer.echo)


@app.command()
def probe(model: str = typer.Option(..., help="A model folder trained by `interpkit physics train`."),
          what: str = typer.Option(..., help="cfg (DP states) | igsm (V-probes) | mistakes (part 2.2)"),
          n: int = typer.Option(300, help="Strings / problems / pairs."),
          random_baseline: bool = typer.Option(True, help="Also probe a random-weight copy."),
          targets: str = typer.Option(None, help="igsm: comma-separated V-probe targets (default all).")) -> None:
    """Probe a trained model, with the same probe on random weights as the baseline."""
    from interpkit.analyses.physics.command import physics_probe_command

    physics_probe_command(model, what, n=n, random_baseline=random_baseline, echo=typer.echo,
                          targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None)
