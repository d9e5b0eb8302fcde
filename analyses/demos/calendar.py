"""A tiny GPT-2 trained here on weekday and month arithmetic: a model with a circle to find offline.

``python -m analyses.demos.calendar --out artifacts/models/calendar-demo`` trains it on CPU (about a
minute), on a word-level tokenizer over the words of ``tasks.calendar``'s prompts, with the problems
split into train and held-out (a, b) pairs. It writes a HF model directory (config, safetensors weights,
tokenizer) plus ``recipe.json`` (command, seed, wall time, accuracies), loadable with
``load_model("artifacts/models/calendar-demo")``.

``train_answer_lm`` is a generic loop (cross-entropy on the answer token after each prompt) usable for
any PromptSet-style data.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<unk>"]


def build_tokenizer():
    """Word-level tokenizer over every word of the days/months prompts and answers (pad id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from interpkit.tasks import calendar

    pre = pre_tokenizers.Whitespace()
    words = []
    for kind, names in (("days", calendar.DAYS), ("months", calendar.MONTHS)):
        for text, *_ in calendar.problems(kind):
            words += [w for w, _ in pre.pre_tokenize_str(text)]
        words += names
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")
    fast.padding_side = "left"
    return fast


@dataclass
class DemoConfig:
    seed: int = 0
    test_frac: float = 0.2            # data: held-out share of each task's problems
    neighbor_smoothing: float = 0.15  # target mass on each of the two neighbouring days/months
    n_layers: int = 2                 # model: a tiny GPT-2
    d_model: int = 64
    n_heads: int = 4
    lr: float = 3e-3                  # optimiser: AdamW
    weight_decay: float = 2.0         # strong decay: the held-out problems are solved after ~1000 steps
    schedule: str = "cosine"          # cosine | constant (after warmup)
    steps: int = 2500                 # stopping: the steps decide the result
    max_seconds: float = 175.0        # CPU seconds (process time), a safety stop


def calendar_data(tokenizer, test_frac: float, seed: int) -> dict:
    """Both tasks' full grids as one left-padded batch, with a per-task held-out split of problems."""
    from interpkit.tasks import calendar

    sets = [calendar.build_days(tokenizer), calendar.build_months(tokenizer)]
    T = max(p.input_ids.shape[1] for p in sets)
    ids, mask, ans, test, kind, prev, nxt = [], [], [], [], [], [], []
    g = torch.Generator().manual_seed(seed)
    for k, p in enumerate(sets):
        pad = T - p.input_ids.shape[1]
        ids.append(torch.nn.functional.pad(p.input_ids, (pad, 0), value=tokenizer.pad_token_id))
        mask.append(torch.nn.functional.pad(p.attention_mask, (pad, 0), value=0))
        ans.append(p.answer_ids[:, 0])
        names = calendar.DAYS if k == 0 else calendar.MONTHS
        word_id = torch.tensor(tokenizer.convert_tokens_to_ids(names))
        c = torch.tensor(p.meta["c"])
        prev.append(word_id[(c - 1) % len(names)])
        nxt.append(word_id[(c + 1) % len(names)])
        is_test = torch.zeros(len(p), dtype=torch.bool)
        is_test[torch.randperm(len(p), generator=g)[:round(test_frac * len(p))]] = True
        test.append(is_test)
        kind.append(torch.full((len(p),), k))
    return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask), "answer": torch.cat(ans),
            "test": torch.cat(test), "kind": torch.cat(kind), "prev": torch.cat(prev), "next": torch.cat(nxt)}


def soft_targets(data: dict, vocab_size: int, smoothing: float) -> torch.Tensor:
    """[N, V] target distributions: 1 - 2s on the answer, s on the previous and on the next day/month."""
    q = torch.zeros(len(data["answer"]), vocab_size)
    rows = torch.arange(len(q))
    q[rows, data["answer"]] = 1 - 2 * smoothing
    q[rows, data["prev"]] += smoothing
    q[rows, data["next"]] += smoothing
    return q


def _last_logits(hf, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp_min(0)            # the position ids nnsight uses for left padding
    return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]


def train_answer_lm(hf, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, *, steps: int, lr: float,
                    weight_decay: float, seed: int = 0, batch_size: int | None = None, max_seconds: float | None = None,
                    schedule: str = "constant", eval_fn=None, eval_every: int = 250, log=print) -> dict:
    """AdamW on cross-entropy at the last position of ``ids`` [N, T] against ``targets``: answer ids [N] or
    target distributions [N, vocab]. Linear warmup,
    then a constant (weight decay keeps acting: the regime where modular addition generalises) or cosine lr.

    Full-batch unless ``batch_size``; stops after ``steps`` or ``max_seconds`` of CPU (process) time.
    ``eval_fn(hf)`` returns a dict logged every ``eval_every`` steps. Returns {steps, wall_s, cpu_s, loss,
    history}.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    decay = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))) if schedule == "cosine" else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * decay(s))
    hf.train()
    t0, c0, history, loss = time.perf_counter(), time.process_time(), [], float("nan")
    step = 0
    for step in range(1, steps + 1):
        rows = torch.randperm(len(ids), generator=g)[:batch_size] if batch_size else slice(None)
        logits = _last_logits(hf, ids[rows], mask[rows])
        l = torch.nn.functional.cross_entropy(logits, targets[rows])
        opt.zero_grad()
        l.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = l.item()
        out_of_time = max_seconds is not None and time.process_time() - c0 > max_seconds
        if eval_fn is not None and (step % eval_every == 0 or step == steps or out_of_time):
            hf.eval()
            rec = {"step": step, "loss": round(loss, 4), "cpu_s": round(time.process_time() - c0, 1), **eval_fn(hf)}
            hf.train()
            history.append(rec)
            log(json.dumps(rec))
        if out_of_time:
            break
    hf.eval()
    return {"steps": step, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "loss": loss,
            "history": history}


@torch.no_grad()
def accuracy(hf, data: dict, rows: torch.Tensor) -> float:
    """Argmax accuracy of the answer token on ``rows`` (a bool mask)."""
    logits = _last_logits(hf, data["input_ids"][rows], data["attention_mask"][rows])
    return float((logits.argmax(-1) == data["answer"][rows]).float().mean())


def train_calendar_demo(out: str | Path, cfg: DemoConfig | None = None, log=print) -> dict:
    """Train, save (model, tokenizer, recipe.json) into ``out``, return the recipe."""
    from transformers import AutoModelForCausalLM

    from interpkit.models import tiny_config

    cfg = cfg or DemoConfig()
    torch.set_num_threads(1)
    tok = build_tokenizer()
    data = calendar_data(tok, cfg.test_frac, cfg.seed)
    mc = tiny_config("gpt2", len(tok), n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads)
    mc.n_positions = 32
    mc.pad_token_id = tok.pad_token_id
    torch.manual_seed(cfg.seed)
    hf = AutoModelForCausalLM.from_config(mc, attn_implementation="eager")
    train = ~data["test"]

    def evaluate(m):
        out = {}
        for k, name in enumerate(("days", "months")):
            sel = data["kind"] == k
            out[f"{name}_train"] = round(accuracy(m, data, sel & train), 3)
            out[f"{name}_test"] = round(accuracy(m, data, sel & ~train), 3)
        return out

    targets = soft_targets(data, len(tok), cfg.neighbor_smoothing) if cfg.neighbor_smoothing else data["answer"]
    run = train_answer_lm(hf, data["input_ids"][train], data["attention_mask"][train], targets[train],
                          steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
                          max_seconds=cfg.max_seconds, schedule=cfg.schedule, eval_fn=evaluate, log=log)
    final = evaluate(hf)
    for k, name in enumerate(("days", "months")):
        final[f"{name}_all"] = round(accuracy(hf, data, data["kind"] == k), 3)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf.name_or_path = "calendar-demo"
    hf.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    recipe = {"command": "python -m analyses.demos.calendar " + " ".join(sys.argv[1:]) if __name__ == "__main__"
              else f"interpkit.analyses.demos.calendar.train_calendar_demo({str(out)!r}, {cfg!r})",
              "seed": cfg.seed, "config": asdict(cfg), "steps_run": run["steps"], "wall_s": round(run["wall_s"], 1),
              "cpu_s": round(run["cpu_s"], 1),
              "final_loss": round(run["loss"], 4), "accuracy": final,
              "data": "tasks.calendar days (49) + months (144) problems; held-out (a, b) pairs per task: "
                      f"{int(data['test'].sum())} of {len(data['test'])}; answer targets put "
                      f"{cfg.neighbor_smoothing} on each neighbouring day/month",
              "torch": torch.__version__, "history": run["history"]}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    return recipe


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="artifacts/models/calendar-demo")
    for f, v in asdict(DemoConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    a = vars(p.parse_args(argv))
    out = a.pop("out")
    recipe = train_calendar_demo(out, DemoConfig(**a))
    print(json.dumps(recipe["accuracy"]), f"wall {recipe['wall_s']} s ->", out)


if __name__ == "__main__":
    main()
