"""Checks of CLI options, run at the top of each command before anything is loaded or written.

Each check raises ``UserError`` with one line: the option, the value given, and what to pass instead.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, fields
from pathlib import Path

from interpkit.errors import UserError


def _num(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UserError(f"{name} must be a number (got {value!r})")
    return value


def count(name: str, value: int | None, minimum: int = 1) -> None:
    """``value`` (when given) is an integer >= ``minimum``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer (got {value!r})")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum} (got {value}); pass a count of at least {minimum}")


def at_least(name: str, value: float | None, minimum: float, *, strict: bool = False) -> None:
    """``value`` (when given) is >= ``minimum`` (> with ``strict``) and finite."""
    if value is None:
        return
    _num(name, value)
    if math.isinf(value) or (value <= minimum if strict else value < minimum):
        raise UserError(f"{name} must be {'>' if strict else '>='} {minimum:g} (got {value:g})")


def in_range(name: str, value: float | None, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> None:
    """``value`` (when given) lies in [low, high] (ends opened as asked)."""
    if value is None:
        return
    _num(name, value)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"{name} must be in {interval} (got {value:g})")


def choice(name: str, value: str | None, options: tuple[str, ...]) -> None:
    if value is not None and value not in options:
        raise UserError(f"{name} {value!r} is not one of {', '.join(options)}")


def nonempty(name: str, value: str | None) -> None:
    if value is not None and not value.strip():
        raise UserError(f"{name} is empty; pass a value")


def run_id(value: str | None) -> None:
    """A run id names one folder: no path separators, no '..', no leading dot, printable."""
    if value is None:
        return
    if (not value.strip() or "/" in value or "\\" in value or value in (".", "..") or value.startswith(".")
            or os.sep in value or any(not c.isprintable() for c in value)):
        raise UserError(f"--run-id {value!r} must be a plain folder name (letters, digits, -_.; no '/', "
                        f"'..' or leading dot)")


def int_list(name: str, values: list[int] | None, minimum: int = 0) -> None:
    if values is None:
        return
    if not values:
        raise UserError(f"{name} is empty; pass comma-separated integers or leave it out")
    bad = [v for v in values if v < minimum]
    if bad:
        raise UserError(f"{name} has {bad[0]}; values must be >= {minimum}")
    if len(set(values)) != len(values):
        raise UserError(f"{name} repeats a value ({values}); list each once")


def conflict(when: bool, message: str) -> None:
    """Reject a flag combination: ``message`` says which flags and why."""
    if when:
        raise UserError(message)


def writable_dir(name: str, path: str | Path) -> None:
    """``path`` is, or can be created as, a folder this process can write (nothing is created)."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{name} {str(path)!r}: {probe} is a file, not a folder; pass a folder")
    if not os.access(probe, os.W_OK | os.X_OK) or _pseudo_fs(probe):
        raise UserError(f"{name} {str(path)!r} is not writable ({probe}); pass a folder you can write")


def _pseudo_fs(path: Path) -> bool:
    """/proc and /sys accept access() checks as root but not new folders."""
    parts = path.resolve().parts
    return len(parts) > 1 and parts[1] in ("proc", "sys")


def readable_file(name: str, path: str | None) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{name} {path!r} does not exist or is not a file; check the path")
    if not os.access(p, os.R_OK):
        raise UserError(f"{name} {path!r} is not readable; check its permissions")


def json_object(name: str, path: str, key: str | None = None) -> dict:
    """The JSON object in ``path`` (its ``key`` member when given), or a one-line error."""
    readable_file(name, path)
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{name} {path!r} is not valid JSON ({e.__class__.__name__}); fix or replace the file") from None
    if key is not None:
        data = data.get(key) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        what = f'an object with a "{key}" object' if key else "a JSON object"
        raise UserError(f"{name} {path!r} must hold {what}; fix or replace the file")
    return data


def model_name(value: str) -> None:
    """A model is a tiny:<family>, a built-in real model, a .gguf file (checked by ``interpkit.gguf``),
    an existing local folder, or something shaped like a hub id."""
    from interpkit.gguf import BUILTIN

    nonempty("--model", value)
    if value.startswith("tiny:") or value in BUILTIN or value.lower().endswith(".gguf"):
        return
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"--model {value!r} is a file; pass a model folder (with config.json), a hub id "
                            f"or tiny:<family>")
        return
    if value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or "\\" in value:
        raise UserError(f"--model {value!r}: no such folder; pass an existing model folder, a hub id "
                        f"(e.g. gpt2) or tiny:<family>")


def dataclass_values(name: str, values: dict, cls) -> None:
    """Each value of ``values`` (from a YAML/JSON file) has the type of ``cls``'s field of that name."""
    for f in fields(cls):
        if f.name not in values:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
        _check_type(f"{name}: {f.name}", values[f.name], default, str(f.type))


def _check_type(name: str, value, default, annotation: str) -> None:
    if value is None and "None" in annotation:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        want = "true or false"
    elif isinstance(default, int) and "float" not in annotation and "str" not in annotation:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif isinstance(default, float) or "float" in annotation:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) or (
            "str" in annotation and isinstance(value, str))
        want = "a number" + (" or text" if "str" in annotation else "")
    elif isinstance(default, list):
        ok = isinstance(value, (list, str)) and all(isinstance(v, str) for v in
                                                    (value if isinstance(value, list) else [value]))
        want = "a list of names"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        want = "text"
    else:
        return
    if not ok:
        raise UserError(f"{name} must be {want} (got {value!r})")


def seed(name: str, value: int | None) -> None:
    if value is not None:
        count(name, value, 0)
        if value >= 2 ** 32:
            raise UserError(f"{name} must be < 2**32 (got {value})")


def noise(name: str, value) -> None:
    """A noise rule, checked by the one parser the engines use (``analyses.causal_tracing.noise.parse_rule``)."""
    if value is None:
        return
    from interpkit.analyses.causal_tracing.noise import parse_rule

    try:
        parse_rule(value)
    except UserError as e:
        raise UserError(str(e).replace("--noise", name, 1)) from None


def yaml_mapping(name: str, path: str) -> dict:
    """The mapping in a YAML file, or a one-line error."""
    import yaml

    readable_file(name, path)
    try:
        values = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{name} {path!r} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(values, dict):
        raise UserError(f"{name} {path!r} must be a mapping of option: value")
    return values


# -- per command: one call at the top of each CLI command ---------------------------------------------
def demo_options(out: str) -> None:
    writable_dir("--out", out)


def train_options(recipe: str | None, output_dir: str, given: dict) -> dict:
    """Checks train's options; returns the recipe's config (empty without --recipe)."""
    from interpkit.analyses.state_tracking.training import TrainConfig

    count("--n", given.get("n"), 2)
    for opt, key in (("--layers", "n_layers"), ("--d-model", "d_model"), ("--heads", "n_heads"),
                     ("--train-len", "train_len"), ("--steps", "steps"), ("--batch-size", "batch_size"),
                     ("--window", "window")):
        count(opt, given.get(key))
    at_least("--lr", given.get("lr"), 0.0, strict=True)
    seed("--seed", given.get("seed"))
    base = json_object("--recipe", recipe, key="config") if recipe else {}
    dataclass_values(f"--recipe {recipe}", base, TrainConfig)
    merged = {**base, **{k: v for k, v in given.items() if v is not None}}
    count(f"n in --recipe {recipe}", merged.get("n"), 2)
    for key in ("n_layers", "d_model", "n_heads", "train_len", "steps", "batch_size"):
        count(f"{key} in --recipe {recipe}", merged.get(key))
    at_least(f"lr in --recipe {recipe}", merged.get("lr"), 0.0, strict=True)
    d, h = merged.get("d_model", 64), merged.get("n_heads", 4)
    conflict(d % h != 0, f"--d-model {d} is not divisible by --heads {h}; pick a head count that divides it")
    writable_dir("--output-dir", output_dir)
    return base


def eval_options(model: str, factor: int, train_len: int | None, n: int, stories: int, seed_: int,
                 out: str) -> tuple[int, int]:
    """Checks eval's options; returns (train_len, n), read from the model's recipe.json when not given."""
    model_name(model)
    if not Path(model).expanduser().is_dir():
        raise UserError(f"--model {model!r} is not a local model folder; eval needs a trained model directory")
    count("--factor", factor)
    count("--stories", stories)
    count("--n", n, 2)
    count("--train-len", train_len)
    seed("--seed", seed_)
    writable_dir("--out", out)
    recipe = Path(model).expanduser() / "recipe.json"
    if recipe.exists():
        cfg = json_object("recipe.json of --model", str(recipe), key="config")
        if not isinstance(cfg.get("train_len"), int) or not isinstance(cfg.get("n"), int):
            raise UserError(f"{model} is not a permutation state-tracking model (its recipe.json has no train_len "
                            f"and n); eval measures state tracking: pass a model trained by interpkit train")
        return (train_len or cfg["train_len"]), (cfg["n"] if train_len is None else n)
    if train_len is None:
        raise UserError(f"{model} has no recipe.json; pass --train-len")
    return train_len, n


def serve_options(model: str, api_key: str, seconds: float) -> None:
    model_name(model)
    nonempty("--api-key", api_key)
    at_least("--seconds", seconds, 0.0)


def attn_trace_options(model: str, prompts: int, seed_: int, batch_size: int, attn_factor: float,
                       shares: dict[str, float], run_id_: str | None) -> None:
    model_name(model)
    count("--prompts", prompts)
    count("--batch-size", batch_size)
    seed("--seed", seed_)
    at_least("--attn-factor", attn_factor, 0.0)
    for opt, value in shares.items():
        in_range(opt, value, 0.0, 1.0, low_open=True)
    run_id(run_id_)


def circuit_options(action: str, run: str, what: str, min_prompts: int, min_effect: float,
                    min_frequency: float, actions: tuple[str, ...]) -> None:
    """``actions``: the circuit actions (``analyses.attention_tracing.command.ACTIONS``; passed in, as
    importing them here would close an import cycle)."""
    choice("action", action, actions)
    choice("--what", what, ("edge", "input"))
    count("--min-prompts", min_prompts)
    at_least("--min-effect", min_effect, 0.0)
    in_range("--min-frequency", min_frequency, 0.0, 1.0)
    if not Path(run).is_dir():
        raise UserError(f"--run {run!r} is not a folder; pass artifacts/attn_trace/<run-id>")


def causal_trace_options(model: str, facts: int | None, noise_: str | None, config: str | None,
                         samples: int | None, window: int | None, seed_: int | None, max_rows: int | None,
                         run_id_: str | None, root: str, config_cls: type) -> None:
    """``config_cls``: the dataclass whose fields a ``--config`` YAML sets (``analyses.causal_tracing.trace.TraceConfig``;
    passed in, as importing it here would close an import cycle)."""
    model_name(model)
    count("--facts", facts)
    count("--samples", samples)
    count("--window", window)
    count("--max-rows", max_rows)
    seed("--seed", seed_)
    noise("--noise", noise_)
    run_id(run_id_)
    writable_dir("--root", root)
    if config is not None:
        values = yaml_mapping("--config", config)
        dataclass_values(f"--config {config}", values, config_cls)
        for key in ("samples", "window", "max_rows", "facts_per_chunk"):
            count(f"--config {config}: {key}", values.get(key))
        seed(f"--config {config}: seed", values.get("seed"))
        noise(f"--config {config}: noise", values.get("noise"))


def probe_options(model: str, n: int, targets: list[str], positions: str, seed_: int) -> None:
    model_name(model)
    count("--n", n, 2)
    seed("--seed", seed_)
    if not targets:
        raise UserError("--targets names no meta field; pass comma-separated names, e.g. a,b,c")
    nonempty("--positions", positions)


def vprobe_options(model: str, n: int | None, seed_: int) -> None:
    model_name(model)
    count("--n", n, 2)
    seed("--seed", seed_)


def circle_options(model: str, k: int, layers: list[int] | None, seed_: int) -> None:
    model_name(model)
    count("--k", k)
    int_list("--layers", layers)
    seed("--seed", seed_)
