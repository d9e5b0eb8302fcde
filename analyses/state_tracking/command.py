"""`interpkit eval`: length generalisation, layer skipping, random baseline, lengthwise probe, signature."""
from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------------
# `interpkit eval`: length generalisation, layer skipping, random baseline, lengthwise probe
# --------------------------------------------------------------------------------------------------
from interpkit.analyses.state_tracking.signature import SignatureRun, measure_signature


def parse_lengths(text: str) -> list[int]:
    """"start:end[:step]" (end inclusive) or "4,8,16" -> sorted lengths >= 1."""
    from interpkit.errors import UserError

    try:
        if ":" in text:
            parts = [int(x) for x in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            lengths = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
        else:
            lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad --lengthwise {text!r}; use start:end[:step] (e.g. 2:16:2) or a list 4,8,16") from None
    if not lengths or min(lengths) < 1:
        raise UserError(f"bad --lengthwise {text!r}: lengths must be >= 1 and the range non-empty")
    return sorted(set(lengths))


def story_prompts(tokenizer, group: int = 3, scratchpad: bool = False):
    """``make_prompts(length, n, seed)`` for ``analyses.probing.linear.lengthwise_probe``: random stories of S_group
    (with their true states interleaved for scratchpad models) with final-state and final-parity labels."""
    from interpkit.tasks.permutations import (
        sample_stories,
        story_tokens,
        symmetric_group,
    )

    def make(length: int, n: int, seed: int):
        st = sample_stories(n, length, group, seed=seed)
        ids = story_tokens(st.actions, tokenizer, group, scratchpad)[0]
        return ({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                {"state": st.states[:, -1], "parity": symmetric_group(group).parity[st.states[:, -1]]})
    return make


def eval_command(model: str, *, factor: int = 2, train_len: int | None = None, n: int = 3, stories: int = 1000,
                 seed: int = 12345, out: str = "artifacts/eval", dtype: str = "float32",
                 skip_layers: list[int] | None = None, random_baseline: bool = False, lengthwise: str | None = None,
                 probe_stories: int = 300, signature: bool = False, echo=print) -> dict:
    """``interpkit eval``: state/parity accuracy per position up to ``factor`` x the training length
    (optionally in bfloat16, with layers skipped, or on a random-weight copy), and the lengthwise probe
    (final-position state/parity probes per layer and length). Writes eval.json and plots to ``out``."""
    import json
    from pathlib import Path

    from interpkit.analyses.state_tracking.training import (
        evaluate_length_generalization,
        plot_accuracy,
    )

    from interpkit.errors import UserError
    from interpkit.models import load_model

    checks = [(dtype in ("float32", "bfloat16"), f"--dtype {dtype!r}; use float32 or bfloat16"),
              (factor >= 1, "--factor must be >= 1"), (stories >= 1, "--stories must be >= 1"),
              (probe_stories >= 10, "--probe-stories must be >= 10")]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"bad eval option: {msg}")
    lengths = parse_lengths(lengthwise) if lengthwise else None
    recipe = Path(model) / "recipe.json"
    cfg = json.loads(recipe.read_text())["config"] if recipe.exists() else {}
    if train_len is None:
        if not cfg:
            raise UserError(f"{model} has no recipe.json; pass --train-len")
        train_len, n = cfg["train_len"], cfg["n"]
    scratchpad = cfg.get("supervision") == "scratchpad"
    lm = load_model(model, dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    label = model
    if random_baseline:
        from interpkit.analyses.probing.linear import random_like

        lm, label = random_like(lm, seed=seed), f"{model} (random weights)"
    res = evaluate_length_generalization(lm.hf, lm.tokenizer, n=n, train_len=train_len, factor=factor,
                                         n_stories=stories, seed=seed, skip_layers=skip_layers, scratchpad=scratchpad,
                                         progress=True)
    res.update(model=label, dtype=dtype, skip_layers=skip_layers or [], random_baseline=random_baseline,
               scratchpad=scratchpad)
    Path(out).mkdir(parents=True, exist_ok=True)
    title = label + (f", layers {skip_layers} skipped" if skip_layers else "")
    plot_accuracy(res, Path(out) / "accuracy_vs_length.png", title=title)
    echo(f"state accuracy within training length (min) {res['min_state_acc_in_train_len']:.4f}; "
         f"at {factor}x (last position) {res['state_acc'][-1]:.4f}; beyond (mean) {res['mean_state_acc_beyond']:.4f}; "
         f"cutoff(0.98) state {res['state_cutoff']}, parity {res['parity_cutoff']}")
    if lengths:
        from interpkit.analyses.probing.linear import ProbeConfig, lengthwise_probe

        lw = lengthwise_probe(lm, story_prompts(lm.tokenizer, n, scratchpad), lengths, n_prompts=probe_stories,
                              cfg=ProbeConfig(seed=seed))
        lw.plot(Path(out) / "lengthwise_probe.png")
        lw.to_dataframe().to_csv(Path(out) / "lengthwise_probe.csv", index=False)
        res["lengthwise"] = {"lengths": lw.lengths, "layers": lw.layers,
                             "state_test_acc": lw.test_acc[0].tolist(), "parity_test_acc": lw.test_acc[1].tolist(),
                             "state_first_layer": lw.first_decodable_layer("state"),
                             "parity_first_layer": lw.first_decodable_layer("parity")}
        echo(lengthwise_table(lw))
    if signature:
        res["signature"] = signature_report(measure_signature(lm, n, train_len, scratchpad=scratchpad), echo)
    (Path(out) / "eval.json").write_text(json.dumps(res, indent=1))
    echo(f"plots and eval.json in {out}/")
    return res


def signature_report(run: SignatureRun, echo=print) -> dict:
    """Print the signature's evidence (probe accuracy by layer, prefix boundaries, verdict); return it as JSON."""
    i_s, i_p = run.probes.targets.index("state"), run.probes.targets.index("parity")
    rows = {"state": [round(float(a), 3) for a in run.probes.test_acc[i_s]],
            "parity": [round(float(a), 3) for a in run.probes.test_acc[i_p]]}
    echo("signature: probe accuracy by layer (0 = embeddings), held-out stories")
    for name, accs in rows.items():
        echo(f"  {name:<7}" + "".join(f"{a:>7.3f}" for a in accs))
    sig = run.signature
    echo(f"  prefix boundary by layer: same parity {run.boundaries['same']}, other parity {run.boundaries['diff']}")
    echo(f"  verdict: {sig.verdict} ({sig.strength}): {sig.reason}")
    return {"state_probe": rows["state"], "parity_probe": rows["parity"], "boundary_same": run.boundaries["same"],
            "boundary_diff": run.boundaries["diff"], "verdict": sig.verdict, "strength": sig.strength, "reason": sig.reason}


def lengthwise_table(lw) -> str:
    """Final-position state probe accuracy, layer x length, plus the first layer reaching 0.9."""
    i = lw.targets.index("state")
    lines = ["lengthwise probe, final-position state accuracy (rows: layer, 0 = embeddings)",
             "length " + "".join(f"{x:>6}" for x in lw.lengths)]
    for j, layer in enumerate(lw.layers):
        lines.append(f"{layer:>6} " + "".join(f"{float(lw.test_acc[i, j, k]):>6.2f}" for k in range(len(lw.lengths))))
    first = ["-" if f is None else str(f) for f in lw.first_decodable_layer("state")]
    lines.append("first  " + "".join(f"{x:>6}" for x in first) + "   (first layer with state accuracy >= 0.9)")
    return "\n".join(lines)
