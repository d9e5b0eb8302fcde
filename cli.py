"""The interpkit command line: one command per analysis, plus data/train/eval/demo/doctor.

Thin on purpose: each command parses options into the analysis's config and calls the analysis.
Bad input raises ``UserError``; ``main`` prints it as one line and exits with code 2.
"""
from __future__ import annotations

import sys
from typing import Annotated

import typer

from interpkit.load_options import with_load_options  # --dtype / --device on every command that loads a model

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
    """List the built-in real and tiny models and known-good hub ids per family."""
    from interpkit.families import FAMILIES
    from interpkit.gguf import BUILTIN, builtin_path
    from interpkit.remote.status import last_seen, seen_path

    typer.echo("built-in real models (offline, from a PyPI wheel):")
    for m in BUILTIN.values():
        where = builtin_path(m.name)
        typer.echo(f"  {m.name:<14} {m.source}; licence {m.licence}; "
                   + (f"installed ({where})" if where else f"not installed: {m.install_hint}"))

    typer.echo(f"{'family':<9} {'tiny model':<14} hub ids (weights need network; remote=True runs them on NDIF)")
    for fam in FAMILIES.values():
        typer.echo(f"{fam.name:<9} {'tiny:' + fam.name:<14} {', '.join(fam.hub_examples)}")
    typer.echo("seen running on NDIF (recorded by each remote run's pre-check; NDIF's list changes):")
    for fam in FAMILIES.values():
        for hub_id in fam.hub_examples:
            seen = last_seen(hub_id)
            typer.echo(f"  {hub_id:<34} " + (f"seen running {seen.get('last_seen')} on {seen.get('host')}" if seen
                                            else "not seen running yet (a --remote run checks before it starts)"))
    typer.echo(f"  (record: {seen_path()})")


@app.command()
@with_load_options
def demo(retrain: bool = typer.Option(False, help="Train the S3 model from its recipe instead of loading it."),
         out: str = typer.Option("artifacts/demo", help="Where figures and summary.json go."),
         real: bool = typer.Option(True, "--real/--no-real", help="Also the real-model part (smollm2-135m)."),
         quick: bool = typer.Option(False, help="Smaller real-model part (fewer pairs, facts, samples).")) -> None:
    """Offline end-to-end demo: the S3 state-tracking model (eval, probes, patching, AA/PAA verdict) and
    SmolLM2-135M (IOI handover, IOI heads, causal tracing of known facts)."""
    from interpkit.analyses.demos.state_tracking import print_table, run_demo
    from interpkit import validate as V

    V.demo_options(out)
    print_table(run_demo(out, retrain=retrain, log=typer.echo), echo=typer.echo)
    if real:
        from interpkit.analyses.demos.real_model import print_real, run_real_demo

        print_real(run_real_demo(out, quick=quick, log=typer.echo), echo=typer.echo)


@app.command()
def train(recipe: str = typer.Option(None, help="Start from a recipe.json (e.g. artifacts/models/s3-demo/recipe.json)."),
          output_dir: str = typer.Option("artifacts/models/s3-train", help="Checkpoints and the final model."),
          n: int = typer.Option(None, help="S_n: 3 or 5 (any small n)."),
          arch: str = typer.Option(None, help="gpt2 (learned positions), neox (rotary) or mistral (rotary, "
                                              "sliding-window attention: --window), from scratch."),
          window: int = typer.Option(None, help="mistral: attention window in tokens, itself included."),
          base_model: str = typer.Option(None, help="Fine-tune this hub id / local model instead."),
          layers: int = typer.Option(None), d_model: int = typer.Option(None), heads: int = typer.Option(None),
          train_len: int = typer.Option(None, help="Story length (tokens)."),
          steps: int = typer.Option(None), batch_size: int = typer.Option(None), lr: float = typer.Option(None),
          seed: int = typer.Option(None), resume: bool = typer.Option(True, help="Continue from the last checkpoint."),
          supervision: str = typer.Option(None, help="direct_state | parity | next_token (topic-model stories) | "
                                                      "scratchpad (states interleaved, generated)."),
          dtype: str = typer.Option(None, help="float32 | bfloat16 (mixed precision)."),
          patience: int = typer.Option(None, help="Early stopping: evaluations without a lower validation loss."),
          save_every: int = typer.Option(None, help="Save a checkpoint every N steps and keep all of them."),
          eval_every: int = typer.Option(None, help="Steps between validation evaluations."),
          positions: str = typer.Option(None, help="default | none (gpt2 without position embeddings)."),
          rotary_pct: float = typer.Option(None, help="neox: share of each head's dims that rotate."),
          min_len: int = typer.Option(None, help="Mixed lengths: each step's length uniform in [min_len, train_len]."),
          init_std: float = typer.Option(None, help="Initializer std (the demo uses 0.1)."),
          topic_mapping: str = typer.Option(None, help="next_token: JSON topic-word matrix to start from.")) -> None:
    """Train a model on permutation state tracking (direct_state, parity, scratchpad) or topic-model stories (next_token)."""
    from interpkit import validate as V
    from interpkit.analyses.state_tracking.training import train_command

    given = {"n": n, "arch": arch, "base_model": base_model, "n_layers": layers, "d_model": d_model,
             "n_heads": heads, "train_len": train_len, "steps": steps, "batch_size": batch_size, "lr": lr,
             "seed": seed, "supervision": supervision, "dtype": dtype, "patience": patience, "eval_every": eval_every,
             "positions": positions, "rotary_pct": rotary_pct, "min_len": min_len, "init_std": init_std,
             "topic_mapping": topic_mapping, "window": window}
    if save_every is not None:
        given.update(save_every=save_every, keep_checkpoints=0)
    V.train_options(recipe, output_dir, given)
    train_command(recipe, output_dir, {k: v for k, v in given.items() if v is not None}, resume=resume, echo=typer.echo)


@app.command("eval")
def evaluate(model: str = typer.Option(..., help="A trained model directory."),
             factor: int = typer.Option(2, help="Evaluate up to factor x the training length."),
             train_len: int = typer.Option(None, help="Training length (read from recipe.json when present)."),
             n: int = typer.Option(3), stories: int = typer.Option(1000), seed: int = typer.Option(12345),
             out: str = typer.Option("artifacts/eval", help="Where the plot and accuracies go."),
             dtype: str = typer.Option("float32", help="float32 | bfloat16."),
             skip_layers: str = typer.Option(None, help="Layers whose blocks pass the residual through, e.g. 1,3."),
             random_baseline: bool = typer.Option(False, help="Evaluate a random-weight copy of the model instead."),
             lengthwise: str = typer.Option(None, help="Also the lengthwise probe: lengths start:end[:step], "
                                                       "e.g. 2:16:2 (layer x length heatmap of final-state probes)."),
             probe_stories: int = typer.Option(300, help="Stories per length for the lengthwise probe."),
             signature: bool = typer.Option(False, help="Also the AA/PAA signature at the training length: per-layer "
                                                        "state/parity probes and parity-pair prefix patching.")) -> None:
    """Length generalisation: state/parity accuracy per position up to 2x the training length, 0.98 cutoff."""
    from interpkit.analyses.state_tracking.command import eval_command
    from interpkit import validate as V

    V.eval_options(model, factor, train_len, n, stories, seed, out)
    eval_command(model, factor=factor, train_len=train_len, n=n, stories=stories, seed=seed, out=out, dtype=dtype,
                 skip_layers=_int_list(skip_layers), random_baseline=random_baseline, lengthwise=lengthwise,
                 probe_stories=probe_stories, signature=signature, echo=typer.echo)


@app.command()
def data(out: str = typer.Option("artifacts/data/s3", help="Output directory (train.npz, test.npz)."),
         n: int = typer.Option(3), length: int = typer.Option(100), stories: int = typer.Option(100_000),
         seed: int = typer.Option(0), train_ratio: float = typer.Option(0.9),
         kind: str = typer.Option("permutations", help="permutations | topic (LDA pretraining stories) | cfg | igsm "
                                                       "(Physics-of-LMs data, --stories examples, JSON lines)."),
         topics: int = typer.Option(4, help="topic: number of topics."),
         alpha: float = typer.Option(0.3, help="topic: Dirichlet prior of the per-story topic mix."),
         beta: float = typer.Option(0.3, help="topic: Dirichlet prior of the topic-word distributions."),
         topic_mapping: str = typer.Option(None, help="topic: start from this JSON [topics, n!] topic-word matrix.")) -> None:
    """Export permutation state-tracking data or topic-model pretraining data, one file per split."""
    from interpkit import validate as V
    from interpkit.tasks.permutations import data_command

    V.writable_dir("--out", out)
    if kind in ("cfg", "igsm"):                   # issue 18: synthetic CFG strings / iGSM problems
        from interpkit.analyses.physics.command import data_command as physics_data
        physics_data(kind, out, stories, seed, echo=typer.echo)
        return
    for split, path in data_command(out, kind=kind, n=n, length=length, stories=stories, seed=seed,
                                    train_ratio=train_ratio, topics=topics, alpha=alpha, beta=beta,
                                    topic_mapping=topic_mapping).items():
        typer.echo(f"{split}: {path}")


@app.command()
@with_load_options
def serve(model: str = typer.Option("tiny:gpt2", help="The model the loopback server runs requests on."),
          api_key: str = typer.Option("loopback-key", help="The key clients must send (a test key, not yours)."),
          seconds: float = typer.Option(0, help="Stop after this many seconds (0: until Ctrl-C).")) -> None:
    """Run the loopback NDIF-compatible server on 127.0.0.1, to try remote scripts before spending NDIF time."""
    import time

    from interpkit import validate as V
    from interpkit.models import load_model
    from interpkit.remote.loopback import LoopbackNDIF

    V.serve_options(model, api_key, seconds)
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
@with_load_options
def attn_trace(task: str = typer.Option(None, help="ioi | gt | gp (or --dataset)"),
               dataset: str = typer.Option(None, help="Your prompts: a .jsonl or .csv file (instead of --task)."),
               model: str = typer.Option(..., help="Hub id, local dir or tiny:<family>."),
               prompts: int = typer.Option(16, help="Number of prompts to trace."),
               seed: int = typer.Option(0), remote: bool = typer.Option(False, help="Run the activation trace on NDIF."),
               batch_size: int = typer.Option(8, help="Prompts per activation trace."),
               attn_factor: float = typer.Option(1.0, help="Trace edges with attention >= factor/(d+1)."),
               signal_share: float = typer.Option(1.0, help="Share of the relative score the signal must carry."),
               seed_share: float = typer.Option(1.0, help="Share of the logit difference the seeds must cover."),
               upstream_share: float = typer.Option(0.7, help="Share of a signal upstream contributors must cover."),
               require_correct: bool = typer.Option(True, help="Trace only prompts the model answers correctly."),
               labels: str = typer.Option("role", help="Node labels: role (task roles) | tokens (the prompt's "
                                                       "tokens, the paper's -tt) | position."),
               center: bool = typer.Option(True, help="Centre W_Q/W_K over d_model (LayerNorm models; the paper's "
                                                      "TransformerLens weights). --no-center: uncentred."),
               run_id: str = typer.Option(None, help="Run directory name (default: derived from the config)."),
               out: str = typer.Option("artifacts", "--out", "--root", help="Where runs go (<out>/<analysis>/).")) -> None:
    """Attention-causal tracing: Omega-SVD signals of every traced edge into per-prompt circuit graphs."""
    from interpkit.analyses.attention_tracing.command import attn_trace_command
    from interpkit import validate as V

    V.attn_trace_options(model, prompts, seed, batch_size, attn_factor, {"--signal-share": signal_share,
                         "--seed-share": seed_share, "--upstream-share": upstream_share}, run_id)
    attn_trace_command(_task_or_dataset(task, dataset), model, n=prompts, seed=seed, remote=remote,
                       batch_size=batch_size,
                       attn_factor=attn_factor, signal_share=signal_share, seed_share=seed_share,
                       upstream_share=upstream_share, require_correct=require_correct, labels=labels,
                       center=center, run_id=run_id, root=out, echo=typer.echo)


@app.command()
@with_load_options
def circuit(action: str = typer.Argument(..., help="unify | intervene | prune | compare | sweep | sparsity | control"),
            run: str = typer.Option(..., help="An attn-trace run directory."),
            remote: bool = typer.Option(False), what: str = typer.Option("edge", help="edge | input"),
            min_prompts: int = typer.Option(15, help="Keep edges seen in at least this many prompts."),
            min_effect: float = typer.Option(0.2, help="Keep edges with |mean delta logit diff| >= this."),
            min_frequency: float = typer.Option(0.0, help="Drop nodes seen in fewer than this share of prompts."),
            reference: str = typer.Option(None, help="Reference circuit(s) for compare/sweep, comma-separated "
                                                     "(default: the task's: ioi-gpt2-wang2022, gt-gpt2-hanna2023, "
                                                     "gp-gpt2-mathwin2023) or a file."),
            include_mlp: bool = typer.Option(None, "--include-mlp/--no-include-mlp",
                                             help="Compare MLP nodes too (default: as the paper, MLPs for GT/GP)."),
            thresholds: str = typer.Option(None, help="sweep: thresholds, e.g. 0,0.1,0.2 (default 0..1 by 0.05)."),
            attn_thresh: float = typer.Option(0.4, help="control: firings have attention >= this."),
            similarity: float = typer.Option(0.5, help="control: max mean cosine distance of a controlled head."),
            cluster_threshold: float = typer.Option(0.97, help="control: average-linkage cut (cosine distance)."),
            max_prompts: int = typer.Option(16, help="sweep/control: traced prompts used.")) -> None:
    """Circuits from traced graphs: unify, intervene, prune, compare (P/R/F1 bars), threshold sweep,
    sparse attention decomposition, control signals."""
    from interpkit.analyses.attention_tracing.command import ACTIONS, circuit_command
    from interpkit import validate as V

    V.circuit_options(action, run, what, min_prompts, min_effect, min_frequency, actions=ACTIONS)
    ths = None if thresholds is None else _numbers(thresholds)
    circuit_command(action, run, remote=remote, what=what, min_prompts=min_prompts, min_effect=min_effect,
                    min_frequency=min_frequency, reference=reference, include_mlp=include_mlp, thresholds=ths,
                    attn_thresh=attn_thresh, similarity=similarity, cluster_threshold=cluster_threshold,
                    max_prompts=max_prompts, echo=typer.echo)


def _numbers(text: str, kind: type = float) -> list:
    """"0,0.1,0.2" -> [0.0, 0.1, 0.2]: a CLI list of ``kind`` (float or int)."""
    from interpkit.errors import UserError

    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UserError(f"expected comma-separated {what}, got {text!r}") from None


@app.command("causal-trace")
@with_load_options
def causal_trace(model: str = typer.Option(..., help="Hub id, local directory or tiny:<family>."),
                 facts: int = typer.Option(100, help="Trace the first N facts the model knows."),
                 kind: str = typer.Option(None, help="hidden | mlp | attn | all (default all)."),
                 severed: bool = typer.Option(None, "--severed/--no-severed", help="Also severed runs."),
                 noise: str = typer.Option(None, help='"3sigma" (default), "<k>sigma", a number, u<x> (uniform), '
                                                      'm / m<k> (Gaussian, subjects\' covariance), t<dof> (Student-t), '
                                                      'subject (another subject\'s embeddings).'),
                 config: str = typer.Option(None, help="YAML file of TraceConfig fields."),
                 remote: bool = typer.Option(False, help="Run on NDIF: one request per chunk of facts."),
                 task: str = typer.Option("facts", help="facts (known_1000) or synthetic_facts."),
                 samples: int = typer.Option(None, help="Corrupted samples per fact (default 10)."),
                 window: int = typer.Option(None, help="MLP/attention window (default 10)."),
                 seed: int = typer.Option(None), max_rows: int = typer.Option(None, help="Rows per forward."),
                 engine: str = typer.Option(None, help="prefix (default: skips work a restoration cannot "
                                                       "change) or batched (full forwards)."),
                 facts_per_chunk: int = typer.Option(None, help="Facts per stored chunk / remote request (default 8)."),
                 run_id: str = typer.Option(None),
                 root: str = typer.Option("artifacts", "--root", "--out", help="Where runs go."),
                 dataset: str = typer.Option(None, help="Your facts: a .jsonl or .csv file (prompt, answer, subject)."),
                 replace: bool = typer.Option(None, "--replace/--no-replace", help="Replace the subject's embeddings "
                                              "instead of adding noise (alone: by another subject's)."),
                 fact_file: str = typer.Option(None, help="Facts in the known_1000.json format (default: known_1000).")) -> None:
    """ROME causal tracing: which hidden states, MLPs and attention layers carry a fact (resumable)."""
    from interpkit.analyses.causal_tracing.command import causal_trace_command
    from interpkit.analyses.causal_tracing.trace import TraceConfig
    from interpkit import validate as V
    from interpkit.store import remote_scope

    V.causal_trace_options(model, facts, noise, config, samples, window, seed, max_rows, run_id, root,
                           config_cls=TraceConfig)
    with remote_scope(remote):                     # the run store records the run as remote (and where)
        causal_trace_command(model, facts=facts, kind=kind, severed=severed, noise=noise, config=config,
                             remote=remote, task=dataset or task, samples=samples, window=window, seed=seed,
                             max_rows=max_rows, engine=engine, root=root, run_id=run_id, echo=typer.echo,
                             replace=replace, fact_file=fact_file, facts_per_chunk=facts_per_chunk)


def _task_or_dataset(task: str | None, dataset: str | None) -> str:
    """--task or --dataset (a .jsonl/.csv file: tasks.get_task loads it with tasks/custom.py), exactly one."""
    from interpkit.errors import UserError

    if bool(task) == bool(dataset):
        raise UserError("pass exactly one of --task or --dataset")
    return dataset or task


def _int_list(text: str | None) -> list[int] | None:
    """"0,2,5" -> [0, 2, 5]; None when the option is not given."""
    return _numbers(text, int) if text else None


@app.command()
@with_load_options
def patch(task: str = typer.Option(None, help="ioi | gt | gp | permutations (or --dataset)"),
          dataset: str = typer.Option(None, help="Your prompt pairs: .jsonl/.csv (prompt, corrupted_prompt, answer, ...)."),
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
          engine: str = typer.Option("prefix", help="prefix: skip cells and work a patch cannot change (base "
                                                    "run's KV cache); full: the plain reference engine."),
          normalize: str = typer.Option("pair", help="pair: each pair by its own base-source gap; mean: the "
                                                     "batch-mean metric (TransformerLens's convention)."),
          min_gap: float = typer.Option(0.1, help="Exclude pairs whose |source - base| is below this x the median."),
          run_id: str = typer.Option(None),
          out: str = typer.Option("artifacts", "--out", "--root", help="Where runs go (<out>/<analysis>/).")) -> None:
    """Activation patching (exact) and attribution patching by layer x position or layer x head."""
    from interpkit import validate as V

    V.model_name(model)                            # before the heavy imports: a typo fails in a blink
    from interpkit.analyses.patching.command import patch_command

    patch_command(_task_or_dataset(task, dataset), model, site=site, method=method, direction=direction, by=by,
                  remote=remote, n=n,
                  seed=seed, root=out,
                  layers=_int_list(layers), region=region, window=window, mode=mode, metric=metric,
                  max_rows=max_rows, engine=engine, run_id=run_id, normalize=normalize,
                  min_gap=min_gap, echo=typer.echo)


@app.command()
@with_load_options
def probe(model: str = typer.Option(..., help="Hub id, local dir or tiny:<family>."),
          task: str = typer.Option(None, help="A task name (ioi, gt, gp, days, months, facts, permutations)."),
          dataset: str = typer.Option(None, help="Your prompts: a .jsonl or .csv file (instead of --task)."),
          targets: str = typer.Option(..., help="Comma-separated meta fields to decode, e.g. a,b,c."),
          positions: str = typer.Option("last", help="all | last | a role name (e.g. start)."),
          n: int = typer.Option(200, help="Prompts."), seed: int = typer.Option(0),
          remote: bool = typer.Option(False, help="Collect activations on NDIF (one request)."),
          split_by: str = typer.Option(None, help="Keep each value of this field (e.g. name) wholly in train "
                                                  "or in test: an entity-level split."),
          folds: int = typer.Option(1, help="K-fold cross-validation (every prompt, or --split-by group, "
                                            "tested once) instead of one 80/20 split."),
          out: str = typer.Option("artifacts", "--out", "--root", help="Where runs go (<out>/<analysis>/).")) -> None:
    """Linear probes on the residual stream at every layer, split by prompt (or by entity: --split-by)."""
    from interpkit.analyses.probing.command import probe_command
    from interpkit.analyses.probing.linear import ProbeConfig
    from interpkit import validate as V

    names = [t.strip() for t in targets.split(",") if t.strip()]
    V.probe_options(model, n, names, positions, seed)
    V.count("--folds", folds)
    probe_command(model, _task_or_dataset(task, dataset), names, positions=positions, n=n, seed=seed, remote=remote,
                  root=out, split_by=split_by, cfg=ProbeConfig(seed=seed, folds=folds))


@app.command()
@with_load_options
def circle(task: str = typer.Option(..., help="days | months"),
           model: str = typer.Option(..., help="Hub id, local dir or tiny:<family>."),
           k: int = typer.Option(5, help="PCA components of the circle probe."),
           layers: str = typer.Option(None, help="Intervention layers, e.g. 0,1 (default all)."),
           remote: bool = typer.Option(False, help="Run the traces on NDIF."),
           random_baseline: bool = typer.Option(True, help="Also probe a random-weight copy (local models)."),
           seed: int = typer.Option(0),
           role: str = typer.Option("start", help="start (a) | duration (b) | result (c at the final token, with "
                                                   "interventions) | end (c there, probe only)."),
           probe_on: str = typer.Option("cos,sin", help="Probe targets among cos, sin, linear (the paper's "
                                                         "--probe_on_cos/--probe_on_sin)."),
           intervene: bool = typer.Option(True, help="Run the interventions (--no-intervene: probe only)."),
           methods: str = typer.Option("circle,layer,pca,mean", help="Intervention methods (a subset of "
                                                                      "circle, layer, pca, mean)."),
           targets_per_problem: int = typer.Option(None, help="Target values a' per problem (default all p - 1; "
                                                             "fewer: a faster intervention sweep)."),
           max_rows: int = typer.Option(1024, help="Rows per intervention forward (memory knob)."),
           sweep_layer: int = typer.Option(None, help="Intervene inside the circle at this layer (radius x angle)."),
           sweep_between: str = typer.Option("0,1", help="The sweep's two values, e.g. 0,1 (Monday to Tuesday)."),
           rgb_layers: str = typer.Option(None, help="Residual RGB plots / feature deconstruction at these layers."),
           rgb_role: str = typer.Option("end", help="Token of the RGB plots (a role: start, duration, end)."),
           out: str = typer.Option("artifacts", "--out", "--root", help="Where runs go (<out>/<analysis>/).")) -> None:
    """Circular features (Engels et al. 2024): circle probe R^2 per layer, circle interventions, the
    middle-of-circle sweep and residual RGB deconstruction."""
    from interpkit.analyses.circles.command import circle_command
    from interpkit.analyses.circles.features import CircleConfig
    from interpkit import validate as V
    from interpkit.errors import UserError

    V.circle_options(model, k, _int_list(layers), seed)
    between = _int_list(sweep_between) or []
    if len(between) != 2:
        raise UserError(f"--sweep-between {sweep_between!r}: give two values, e.g. 0,1")
    V.count("--targets-per-problem", targets_per_problem)
    V.count("--max-rows", max_rows)
    cfg = CircleConfig(k=k, layers=_int_list(layers), seed=seed, role=role, intervene=intervene,
                       probe_on=tuple(t.strip() for t in probe_on.split(",") if t.strip()),
                       methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                       targets_per_problem=targets_per_problem, max_rows=max_rows)
    circle_command(task, model, remote=remote, cfg=cfg, random_baseline=random_baseline, seed=seed,
                   sweep=None if sweep_layer is None else (sweep_layer, *between),
                   rgb_layers=_int_list(rgb_layers), rgb_role=rgb_role, root=out)


@app.command()
@with_load_options
def vprobe(model: str = typer.Option(..., help="A local model (the probe trains through it)."),
           task: str = typer.Option(None, help="A task name."), target: str = typer.Option(..., help="Meta field."),
           dataset: str = typer.Option(None, help="Your prompts: a .jsonl or .csv file (instead of --task)."),
           n: int = typer.Option(None, help="Prompts (default: the whole task)."), seed: int = typer.Option(0),
           steps: int = typer.Option(300, help="Training steps of the probe (the rank-r update and the head)."),
           out: str = typer.Option("artifacts", "--out", "--root", help="Where runs go (<out>/<analysis>/).")) -> None:
    """V-probe (Allen-Zhu & Li): frozen model, rank-r embedding update + linear head, vs random weights."""
    from interpkit.analyses.probing.vprobe import VProbeConfig, vprobe_command
    from interpkit import validate as V

    V.vprobe_options(model, n, seed)
    V.count("--steps", steps)
    vprobe_command(model, _task_or_dataset(task, dataset), target, n=n, seed=seed, root=out,
                   cfg=VProbeConfig(steps=steps, seed=seed))


# -- everyday tools (issue 16): cache, logit-lens, dla, attention, steer; bodies in analyses/tools/command.py --
# The options every tool shares, declared once (Typer reads the option from the ``Annotated`` metadata).
ToolModel = Annotated[str, typer.Option(help="Hub id, local dir, smollm2-135m or tiny:<family>.")]
ToolDataset = Annotated[str, typer.Option(help="Your prompts: a .jsonl or .csv file.")]
ToolPrompt = Annotated[list[str], typer.Option(help="A prompt (repeatable).")]
ToolDtype = Annotated[str, typer.Option(help="float32 | bfloat16 | float16 (default: the model's own).")]
ToolDevice = Annotated[str, typer.Option(help="e.g. cpu, cuda:0.")]
ToolOut = Annotated[str, typer.Option("--out", "--root", help="Where runs go.")]
ToolRunId = Annotated[str, typer.Option(help="Run directory name (default: derived from the options).")]
ToolRemote = Annotated[bool, typer.Option(help="Run on NDIF (one request).")]


@app.command("cache")
def cache_cmd(model: ToolModel,
              sites: str = typer.Option("resid_pre", help="Comma-separated: resid_pre, resid_post, attn_out, mlp_out, "
                                                          "head_out, pattern, q, k, v."),
              layers: str = typer.Option(None, help="Layers, e.g. 0,5 (default all)."),
              task: str = typer.Option(None, help="A task (ioi, gt, gp, ...)."), dataset: ToolDataset = None,
              prompt: ToolPrompt = None,
              n: int = typer.Option(8, help="Prompts from the task/dataset."), seed: int = typer.Option(0),
              max_gb: float = typer.Option(4.0, help="Refuse when the cache estimate exceeds this (GiB)."),
              remote: ToolRemote = False,
              dtype: ToolDtype = None, device: ToolDevice = None, out: ToolOut = "artifacts",
              run_id: ToolRunId = None) -> None:
    """Activation cache of any uniform sites for a batch in one trace, written to HDF5."""
    from interpkit.analyses.tools.command import cache_command

    cache_command(model, sites=sites, layers=_int_list(layers), task=task, dataset=dataset, prompts=prompt, n=n,
                  seed=seed, remote=remote, dtype=dtype, device=device, max_gb=max_gb, out=out, run_id=run_id,
                  echo=typer.echo)


@app.command("logit-lens")
def logit_lens_cmd(model: ToolModel, task: str = typer.Option(None, help="A task (ioi, gt, gp, ...)."),
                   dataset: ToolDataset = None, prompt: ToolPrompt = None,
                   n: int = typer.Option(16), seed: int = typer.Option(0),
                   top_k: int = typer.Option(5, help="Top tokens per layer and position."),
                   remote: ToolRemote = False,
                   dtype: ToolDtype = None, device: ToolDevice = None, out: ToolOut = "artifacts",
                   run_id: ToolRunId = None) -> None:
    """Logit lens: final norm + unembedding on the residual at every layer; answer rank/probability per layer."""
    from interpkit.analyses.tools.command import logit_lens_command

    logit_lens_command(model, task=task, dataset=dataset, prompts=prompt, n=n, seed=seed, top_k=top_k,
                       remote=remote, dtype=dtype, device=device, out=out, run_id=run_id, echo=typer.echo)


@app.command("dla")
def dla_cmd(model: ToolModel, task: str = typer.Option(None, help="A task with answers (ioi, gt, gp, ...)."),
            dataset: str = typer.Option(None, help="Your prompts: a .jsonl or .csv file with answers."),
            n: int = typer.Option(16), seed: int = typer.Option(0), top: int = typer.Option(10),
            by_source: bool = typer.Option(False, help="Also split each head by source position."),
            remote: ToolRemote = False,
            dtype: ToolDtype = None, device: ToolDevice = None, out: ToolOut = "artifacts",
            run_id: ToolRunId = None) -> None:
    """Direct logit attribution of the logit difference to embedding, heads and MLPs (final-norm scale frozen)."""
    from interpkit.analyses.tools.command import dla_command

    dla_command(model, task=task, dataset=dataset, n=n, seed=seed, top=top, by_source=by_source, remote=remote,
                dtype=dtype, device=device, out=out, run_id=run_id, echo=typer.echo)


@app.command("attention")
def attention_cmd(model: ToolModel, task: str = typer.Option(None, help="A task (ioi, gt, gp, permutations, ...)."),
                  dataset: ToolDataset = None, prompt: ToolPrompt = None,
                  n: int = typer.Option(16), seed: int = typer.Option(0),
                  roles: str = typer.Option(None, help="dest:src role pairs, e.g. end:IO,S2:S1."),
                  dest: str = typer.Option(None, help="Show where this role (e.g. end) attends, per layer."),
                  show: int = typer.Option(0, help="Prompt whose patterns are drawn."),
                  layers: str = typer.Option(None, help="Layers, e.g. 0,5 (default all)."),
                  detect: bool = typer.Option(False, help="Previous-token / duplicate / induction head detectors."),
                  n_tokens: int = typer.Option(20, help="Detector: length of the repeated random sequence."),
                  threshold: float = typer.Option(0.4, help="Detector: flag heads scoring above this."),
                  remote: bool = typer.Option(False, help="Run on NDIF (all parts in one request)."),
                  dtype: ToolDtype = None, device: ToolDevice = None, out: ToolOut = "artifacts",
                  run_id: ToolRunId = None) -> None:
    """Attention patterns per head, role-to-role attention, and head detectors."""
    from interpkit.analyses.tools.command import attention_command

    attention_command(model, task=task, dataset=dataset, prompts=prompt, n=n, seed=seed, roles=roles, dest=dest,
                      show=show, layers=_int_list(layers), detect=detect, n_tokens=n_tokens, threshold=threshold,
                      remote=remote, dtype=dtype, device=device, out=out, run_id=run_id, echo=typer.echo)


@app.command("steer")
def steer_cmd(model: ToolModel,
              layer: int = typer.Option(..., help="Layer whose output gets the vector."),
              positive: list[str] = typer.Option(None, help="A positive prompt (repeatable)."),
              negative: list[str] = typer.Option(None, help="A negative prompt (repeatable)."),
              positive_file: str = typer.Option(None, help="Positive prompts, one per line."),
              negative_file: str = typer.Option(None, help="Negative prompts, one per line."),
              prompt: list[str] = typer.Option(None, help="A prompt to generate from (repeatable)."),
              coefficients: str = typer.Option("0,4,8", help="Comma-separated coefficients to sweep."),
              max_new_tokens: int = typer.Option(12),
              pos_word: str = typer.Option(None, help="Sweep metric: log p(pos_word) - log p(neg_word)."),
              neg_word: str = typer.Option(None),
              remote: bool = typer.Option(False, help="Run on NDIF (the whole sweep is one request)."),
              dtype: ToolDtype = None, device: ToolDevice = None, out: ToolOut = "artifacts",
              run_id: ToolRunId = None) -> None:
    """Steering by contrastive activation addition, generated side by side with the unsteered text."""
    from interpkit.analyses.tools.command import steer_command

    steer_command(model, layer, positive=positive, negative=negative, positive_file=positive_file,
                  negative_file=negative_file, prompts=prompt, coefficients=_numbers(coefficients),
                  max_new_tokens=max_new_tokens, pos_word=pos_word, neg_word=neg_word, remote=remote, dtype=dtype,
                  device=device, out=out, run_id=run_id, echo=typer.echo)


@app.command()
@with_load_options
def reducibility(model: str = typer.Option(None, help="Also a layer's activations of this model (local)."),
                 task: str = typer.Option("days", help="days | months (with --model)."),
                 layer: int = typer.Option(None, help="Layer (0 = embeddings; default every layer)."),
                 role: str = typer.Option("start", help="Token whose residual is analysed (start, duration, end)."),
                 n: int = typer.Option(1000, help="Points per synthetic cloud."),
                 eps: float = typer.Option(0.1, help="epsilon of the mixture index."),
                 seed: int = typer.Option(0),
                 out: str = typer.Option("artifacts", "--out", "--root", help="Where runs go (<out>/<analysis>/).")) -> None:
    """Engels et al.'s reducibility demo: epsilon-mixture and separability indices on synthetic clouds
    and on the top PCA pairs of a layer's residual."""
    from interpkit.analyses.circles.irreducibility import reducibility_command

    reducibility_command(model, task=task, layer=layer, role=role, n=n, eps=eps, seed=seed, root=out,
                         echo=typer.echo)


# -- issue 18: `interpkit physics ...` and `interpkit sae ...`, sub-groups with their own commands --
physics_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Physics of LMs (Allen-Zhu & Li): synthetic CFG / iGSM models, DP-state and V-probes.")
sae_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Sparse autoencoders on the residual stream; decoder-direction clusters (Engels et al.).")
app.add_typer(physics_app, name="physics")
app.add_typer(sae_app, name="sae")


@physics_app.command("train")
def physics_train(recipe: str = typer.Option(..., help="cfg-demo | igsm-deep | igsm-wide"),
                  output_dir: str = typer.Option(None, help="Default artifacts/models/<recipe>."),
                  steps: int = typer.Option(None), seed: int = typer.Option(None)) -> None:
    """Train a recipe from scratch (resumes from its last checkpoint), evaluate it, export with recipe.json."""
    from interpkit.analyses.physics.command import physics_train_command

    physics_train_command(recipe, output_dir, steps=steps, seed=seed, echo=typer.echo)


@physics_app.command("probe")
def physics_probe(model: str = typer.Option(..., help="A model folder trained by `interpkit physics train`."),
                  what: str = typer.Option(..., help="cfg (DP states) | igsm (V-probes) | mistakes (part 2.2)"),
                  n: int = typer.Option(300, help="Strings / problems / pairs."),
                  random_baseline: bool = typer.Option(True, help="Also probe a random-weight copy."),
                  targets: str = typer.Option(None, help="igsm: comma-separated V-probe targets (default all).")) -> None:
    """Probe a trained model, with the same probe on random weights as the baseline."""
    from interpkit.analyses.physics.command import physics_probe_command

    physics_probe_command(model, what, n=n, random_baseline=random_baseline, echo=typer.echo,
                          targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None)


@sae_app.command("train")
def sae_train(model: str = typer.Option(..., help="Hub id, local dir, tiny:<family> or smollm2-135m."),
              layer: int = typer.Option(..., help="Residual index: 0 = embeddings, l = output of block l-1."),
              width: int = typer.Option(512, help="Number of latents (d_sae)."),
              architecture: str = typer.Option("topk", help="topk | standard (ReLU + L1)."),
              k: int = typer.Option(16, help="topk: active latents per token."),
              l1: float = typer.Option(3e-3, help="standard: L1 coefficient."),
              steps: int = typer.Option(2000), batch_size: int = typer.Option(256), lr: float = typer.Option(1e-3),
              corpus: str = typer.Option("calendar+tasks", help="calendar | tasks | generated | file:PATH, joined by +."),
              max_docs: int = typer.Option(2000), max_tokens: int = typer.Option(48, help="Tokens per document."),
              generated_docs: int = typer.Option(64, help="Documents the model writes for the generated corpus."),
              seed: int = typer.Option(0), root: str = typer.Option("artifacts")) -> None:
    """Train an SAE (resumable: rerun the same command); saved in the sae_lens layout."""
    from interpkit.analyses.sae.command import sae_train_command
    from interpkit.analyses.sae.train import SAETrainConfig

    cfg = SAETrainConfig(layer=layer, width=width, architecture=architecture, k=k, l1=l1, steps=steps,
                         batch_size=batch_size, lr=lr, seed=seed, corpus=corpus, max_docs=max_docs,
                         max_tokens=max_tokens, generated_docs=generated_docs)
    sae_train_command(model, cfg, root=root, echo=typer.echo)


@sae_app.command("load")
def sae_load(path: str = typer.Option(..., help="A folder with cfg.json + sae_weights.safetensors (sae_lens layout).")) -> None:
    """Load an SAE (ours or a public one downloaded in the sae_lens layout) and describe it."""
    from interpkit.analyses.sae.command import sae_load_command

    sae_load_command(path, echo=typer.echo)


@sae_app.command("cluster")
def sae_cluster(sae: str = typer.Option(..., help="An SAE folder (or an `sae train` run directory)."),
                model: str = typer.Option(None, help="Default: the model named in the SAE's cfg.json."),
                method: str = typer.Option("spectral", help="spectral | graph"),
                n_clusters: int = typer.Option(64, help="spectral: number of clusters."),
                cutoff: float = typer.Option(0.5, help="graph: cosine cutoff."),
                top_k: int = typer.Option(2, help="graph: link each latent to at most its top-k neighbours (0: all)."),
                corpus: str = typer.Option("calendar+tasks", help="Text for reconstructions when the run has none."),
                layer: int = typer.Option(None, help="Residual index (default from the SAE's hook name)."),
                max_clusters: int = typer.Option(40, help="Reconstruct the largest this many clusters."),
                seed: int = typer.Option(0), root: str = typer.Option("artifacts")) -> None:
    """Cluster decoder directions; reconstructions, PCA plots by token, irreducibility, circle search."""
    from interpkit.analyses.sae.command import sae_cluster_command

    sae_cluster_command(sae, model=model, method=method, n_clusters=n_clusters, cutoff=cutoff,
                        top_k=top_k or None, corpus=corpus, layer=layer, seed=seed, max_clusters=max_clusters,
                        root=root, echo=typer.echo)


def main() -> None:
    """Console-script entry: bad input and known failures become one line on stderr and exit code 2;
    an unexpected error is one line and exit code 1. ``--debug`` (anywhere) shows tracebacks instead."""
    from interpkit.errors import UserError, explain, first_line

    for stream in (sys.stdout, sys.stderr):            # logs and pipes see each line as it is printed
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv = [a for i, a in enumerate(sys.argv) if i == 0 or a != "--debug"]
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):   # Typer's (click) usage errors
            typer.echo(f"error: {_one_line(e.format_message())} (see --help)", err=True)
            sys.exit(2 if e.exit_code else 0)
        if debug:
            raise
        if isinstance(e, UserError):
            typer.echo(f"error: {_one_line(str(e))}", err=True)
            sys.exit(2)
        mapped = explain(e)
        if mapped is not None:
            typer.echo(f"error: {_one_line(str(mapped))}", err=True)
            sys.exit(2)
        typer.echo(f"error: unexpected {type(e).__name__}: {first_line(e)} (a bug in interpkit: rerun with "
                   f"--debug for the traceback and report it)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    main()
