"""The interpkit command line: one command per analysis, plus data/train/eval/demo/doctor.

Thin on purpose: each command parses options into the analysis's config and calls the analysis.
Bad input raises ``UserError``; ``main`` prints it as one line and exits with code 2.
"""
from __future__ import annotations

import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mechanistic interpretability on nnsight: the same analyses locally or on NDIF.")


@app.command()
def doctor() -> None:
    """Print versions, device, NDIF key presence (never its value) and whether NDIF answers."""
    from interpkit.doctor import report

    for key, value in report().items():
        typer.echo(f"{key:<14} {value}")


@app.command()
def models() -> None:
    """List the built-in tiny models and known-good hub ids per family."""
    from interpkit.families import FAMILIES

    typer.echo(f"{'family':<9} {'tiny model':<14} hub ids (weights need network; remote=True runs them on NDIF)")
    for fam in FAMILIES.values():
        typer.echo(f"{fam.name:<9} {'tiny:' + fam.name:<14} {', '.join(fam.hub_examples)}")


@app.command()
def demo(retrain: bool = typer.Option(False, help="Train the S3 model from its recipe instead of loading it."),
         out: str = typer.Option("artifacts/demo", help="Where figures and summary.json go.")) -> None:
    """Offline end-to-end demo on a small S3 state-tracking model: eval, probes, patching, AA/PAA verdict."""
    from analyses.demo import print_table, run_demo

    print_table(run_demo(out, retrain=retrain, log=typer.echo), echo=typer.echo)


@app.command()
def train(recipe: str = typer.Option(None, help="Start from a recipe.json (e.g. artifacts/models/s3-demo/recipe.json)."),
          output_dir: str = typer.Option("artifacts/models/s3-train", help="Checkpoints and the final model."),
          n: int = typer.Option(None, help="S_n: 3 or 5 (any small n)."),
          arch: str = typer.Option(None, help="gpt2 (learned positions) or neox (rotary), from scratch."),
          base_model: str = typer.Option(None, help="Fine-tune this hub id / local model instead."),
          layers: int = typer.Option(None), d_model: int = typer.Option(None), heads: int = typer.Option(None),
          train_len: int = typer.Option(None, help="Story length (tokens)."),
          steps: int = typer.Option(None), batch_size: int = typer.Option(None), lr: float = typer.Option(None),
          seed: int = typer.Option(None), resume: bool = typer.Option(True, help="Continue from the last checkpoint.")) -> None:
    """Train a model on permutation state tracking (direct-state supervision), resumably."""
    import json

    from interpkit.training import TrainConfig, train as run_train

    base = json.loads(open(recipe).read())["config"] if recipe else {}
    given = {"n": n, "arch": arch, "base_model": base_model, "n_layers": layers, "d_model": d_model,
             "n_heads": heads, "train_len": train_len, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    cfg = TrainConfig.from_dict({**base, **{k: v for k, v in given.items() if v is not None}, "output_dir": output_dir})
    res = run_train(cfg, resume=resume)
    ev = res.final_eval or {}
    typer.echo(f"trained {res.step} steps in {res.wall_s:.0f}s -> {output_dir}; "
               f"held-out min state accuracy {ev.get('min_state_acc', float('nan')):.4f}")


@app.command("eval")
def evaluate(model: str = typer.Option(..., help="A trained model directory."),
             factor: int = typer.Option(2, help="Evaluate up to factor x the training length."),
             train_len: int = typer.Option(None, help="Training length (read from recipe.json when present)."),
             n: int = typer.Option(3), stories: int = typer.Option(1000), seed: int = typer.Option(12345),
             out: str = typer.Option("artifacts/eval", help="Where the plot and accuracies go.")) -> None:
    """Length generalisation: state/parity accuracy per position up to 2x the training length, 0.98 cutoff."""
    import json
    from pathlib import Path

    from interpkit.errors import UserError
    from interpkit.models import load_model
    from interpkit.training import evaluate_length_generalization, plot_accuracy

    recipe = Path(model) / "recipe.json"
    if train_len is None:
        if not recipe.exists():
            raise UserError(f"{model} has no recipe.json; pass --train-len")
        cfg = json.loads(recipe.read_text())["config"]
        train_len, n = cfg["train_len"], cfg["n"]
    lm = load_model(model)
    res = evaluate_length_generalization(lm.hf, lm.tokenizer, n=n, train_len=train_len, factor=factor,
                                         n_stories=stories, seed=seed)
    Path(out).mkdir(parents=True, exist_ok=True)
    plot_accuracy(res, Path(out) / "accuracy_vs_length.png")
    (Path(out) / "eval.json").write_text(json.dumps(res, indent=1))
    typer.echo(f"state accuracy within training length (min) {res['min_state_acc_in_train_len']:.4f}; "
               f"beyond (mean) {res['mean_state_acc_beyond']:.4f}; cutoff(0.98) state {res['state_cutoff']}, "
               f"parity {res['parity_cutoff']}; plot in {out}/")


@app.command()
def data(out: str = typer.Option("artifacts/data/s3", help="Output directory (train.npz, test.npz)."),
         n: int = typer.Option(3), length: int = typer.Option(100), stories: int = typer.Option(100_000),
         seed: int = typer.Option(0), train_ratio: float = typer.Option(0.9)) -> None:
    """Export permutation state-tracking data, one file per split."""
    from tasks.permutations import export_dataset

    for split, path in export_dataset(out, stories, length, n, seed=seed, train_ratio=train_ratio).items():
        typer.echo(f"{split}: {path}")


@app.command()
def serve(model: str = typer.Option("tiny:gpt2", help="The model the loopback server runs requests on."),
          api_key: str = typer.Option("loopback-key", help="The key clients must send (a test key, not yours)."),
          seconds: float = typer.Option(0, help="Stop after this many seconds (0: until Ctrl-C).")) -> None:
    """Run the loopback NDIF-compatible server on 127.0.0.1, to try remote scripts before spending NDIF time."""
    import time

    from interpkit.models import load_model
    from interpkit.remote.loopback import LoopbackNDIF

    lm = load_model(model)
    server = LoopbackNDIF(lm.model, api_key=api_key)
    server.start()
    typer.echo(f"loopback NDIF serving {model} at {server.url}")
    typer.echo(f"in another shell: export NDIF_HOST={server.url} NDIF_API_KEY={api_key}; then use --remote")
    try:
        deadline = time.monotonic() + seconds if seconds else float("inf")
        while time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        typer.echo(f"served {server.n_requests} request(s)")


@app.command("attn-trace")
def attn_trace(task: str = typer.Option(..., help="ioi | gt | gp"),
               model: str = typer.Option(..., help="Hub id, local dir or tiny:<family>."),
               prompts: int = typer.Option(16, help="Number of prompts to trace."),
               seed: int = typer.Option(0), remote: bool = typer.Option(False, help="Run the activation trace on NDIF."),
               batch_size: int = typer.Option(8, help="Prompts per activation trace."),
               attn_factor: float = typer.Option(1.0, help="Trace edges with attention >= factor/(d+1)."),
               signal_share: float = typer.Option(1.0, help="Share of the relative score the signal must carry."),
               seed_share: float = typer.Option(1.0, help="Share of the logit difference the seeds must cover."),
               upstream_share: float = typer.Option(0.7, help="Share of a signal upstream contributors must cover."),
               require_correct: bool = typer.Option(True, help="Trace only prompts the model answers correctly."),
               run_id: str = typer.Option(None, help="Run directory name (default: derived from the config).")) -> None:
    """Attention-causal tracing: Omega-SVD signals of every traced edge into per-prompt circuit graphs."""
    from analyses.attention_tracing.commands import attn_trace_command

    attn_trace_command(task, model, n=prompts, seed=seed, remote=remote, batch_size=batch_size,
                       attn_factor=attn_factor, signal_share=signal_share, seed_share=seed_share,
                       upstream_share=upstream_share, require_correct=require_correct, run_id=run_id,
                       echo=typer.echo)


@app.command()
def circuit(action: str = typer.Argument(..., help="unify | intervene | prune | compare"),
            run: str = typer.Option(..., help="An attn-trace run directory."),
            remote: bool = typer.Option(False), what: str = typer.Option("edge", help="edge | input"),
            min_prompts: int = typer.Option(15, help="Keep edges seen in at least this many prompts."),
            min_effect: float = typer.Option(0.2, help="Keep edges with |mean delta logit diff| >= this."),
            min_frequency: float = typer.Option(0.0, help="Drop nodes seen in fewer than this share of prompts."),
            reference: str = typer.Option("ioi-gpt2-wang2022", help="Reference circuit for compare."),
            include_mlp: bool = typer.Option(False, help="Compare MLP nodes too.")) -> None:
    """Circuits from traced graphs: unify across prompts, intervene on edges, prune, compare to a reference."""
    from analyses.attention_tracing.commands import circuit_command

    circuit_command(action, run, remote=remote, what=what, min_prompts=min_prompts, min_effect=min_effect,
                    min_frequency=min_frequency, reference=reference, include_mlp=include_mlp, echo=typer.echo)


@app.command("causal-trace")
def causal_trace(model: str = typer.Option(..., help="Hub id, local directory or tiny:<family>."),
                 facts: int = typer.Option(100, help="Trace the first N facts the model knows."),
                 kind: str = typer.Option(None, help="hidden | mlp | attn | all (default all)."),
                 severed: bool = typer.Option(None, "--severed/--no-severed", help="Also severed runs."),
                 noise: str = typer.Option(None, help='"3sigma" (default), "<k>sigma" or a number.'),
                 config: str = typer.Option(None, help="YAML file of TraceConfig fields."),
                 remote: bool = typer.Option(False, help="Run on NDIF: one request per chunk of facts."),
                 task: str = typer.Option("facts", help="facts (known_1000) or synthetic_facts."),
                 samples: int = typer.Option(None, help="Corrupted samples per fact (default 10)."),
                 window: int = typer.Option(None, help="MLP/attention window (default 10)."),
                 seed: int = typer.Option(None), max_rows: int = typer.Option(None, help="Rows per forward."),
                 engine: str = typer.Option(None, help="prefix (default: skips work a restoration cannot "
                                                       "change) or batched (full forwards)."),
                 run_id: str = typer.Option(None), root: str = typer.Option("artifacts")) -> None:
    """ROME causal tracing: which hidden states, MLPs and attention layers carry a fact (resumable)."""
    from analyses.causal_tracing import causal_trace_command

    causal_trace_command(model, facts=facts, kind=kind, severed=severed, noise=noise, config=config,
                         remote=remote, task=task, samples=samples, window=window, seed=seed,
                         max_rows=max_rows, engine=engine, root=root, run_id=run_id, echo=typer.echo)


def _int_list(text: str | None) -> list[int] | None:
    """"0,2,5" -> [0, 2, 5] (CLI lists)."""
    from interpkit.errors import UserError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None


@app.command()
def patch(task: str = typer.Option(..., help="ioi | gt | gp | permutations"),
          model: str = typer.Option(..., help="Hub id, local dir or tiny:<family>."),
          site: str = typer.Option("resid", help="resid (= resid_pre) | resid_post | attn | mlp | head | unembed_in"),
          method: str = typer.Option("exact", help="exact | attribution | both"),
          direction: str = typer.Option("denoise", help="denoise (clean into corrupted) | noise"),
          by: str = typer.Option(None, help="position | head (default: head for --site head)"),
          region: str = typer.Option("position", help="position | prefix | suffix | window"),
          window: int = typer.Option(1), mode: str = typer.Option("substitution", help="substitution | deletion"),
          metric: str = typer.Option("logit_diff", help="logit_diff | prob_diff"),
          layers: str = typer.Option(None, help="Layers to sweep, e.g. 0,3,5 (default all)."),
          n: int = typer.Option(64, help="Prompt pairs."), seed: int = typer.Option(0),
          max_rows: int = typer.Option(512, help="Rows per forward (memory knob)."),
          remote: bool = typer.Option(False, help="Run on NDIF: the whole sweep is one request."),
          reuse_prefix: bool = typer.Option(False, help="Skip work a patch cannot change (KV-cache reuse; remotely one request)."),
          run_id: str = typer.Option(None)) -> None:
    """Activation patching (exact) and attribution patching by layer x position or layer x head."""
    from analyses.patching_cli import patch_command

    patch_command(task, model, site=site, method=method, direction=direction, by=by, remote=remote, n=n, seed=seed,
                  layers=_int_list(layers), region=region, window=window, mode=mode, metric=metric,
                  max_rows=max_rows, reuse_prefix=reuse_prefix, run_id=run_id, echo=typer.echo)


@app.command()
def probe(model: str = typer.Option(..., help="Hub id, local dir or tiny:<family>."),
          task: str = typer.Option(..., help="A task name (ioi, gt, gp, days, months, facts, permutations)."),
          targets: str = typer.Option(..., help="Comma-separated meta fields to decode, e.g. a,b,c."),
          positions: str = typer.Option("last", help="all | last | a role name (e.g. start)."),
          n: int = typer.Option(200, help="Prompts."), seed: int = typer.Option(0),
          remote: bool = typer.Option(False, help="Collect activations on NDIF (one request).")) -> None:
    """Linear probes on the residual stream at every layer, split by prompt."""
    from analyses.probing import probe_command

    probe_command(model, task, [t.strip() for t in targets.split(",") if t.strip()], positions=positions, n=n,
                  seed=seed, remote=remote)


@app.command()
def circle(task: str = typer.Option(..., help="days | months"),
           model: str = typer.Option(..., help="Hub id, local dir or tiny:<family>."),
           k: int = typer.Option(5, help="PCA components of the circle probe."),
           layers: str = typer.Option(None, help="Intervention layers, e.g. 0,1 (default all)."),
           remote: bool = typer.Option(False, help="Run the traces on NDIF."),
           random_baseline: bool = typer.Option(True, help="Also probe a random-weight copy (local models)."),
           seed: int = typer.Option(0)) -> None:
    """Circular features (Engels et al. 2024): circle probe R^2 per layer and circle interventions."""
    from analyses.circles import CircleConfig, circle_command

    circle_command(task, model, remote=remote, cfg=CircleConfig(k=k, layers=_int_list(layers), seed=seed),
                   random_baseline=random_baseline, seed=seed)


@app.command()
def vprobe(model: str = typer.Option(..., help="A local model (the probe trains through it)."),
           task: str = typer.Option(..., help="A task name."), target: str = typer.Option(..., help="Meta field."),
           n: int = typer.Option(None, help="Prompts (default: the whole task)."), seed: int = typer.Option(0)) -> None:
    """V-probe (Allen-Zhu & Li): frozen model, rank-r embedding update + linear head, vs random weights."""
    from analyses.vprobe import vprobe_command

    vprobe_command(model, task, target, n=n, seed=seed)


def main() -> None:
    """Console-script entry: run the app, turning UserError into one line on stderr and exit code 2."""
    from interpkit.errors import UserError

    try:
        code = app(standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Exception as e:                         # Typer's (vendored click) usage errors: one line too
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        typer.echo(f"error: {e.format_message()} (see --help)", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
