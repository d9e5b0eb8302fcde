"""Train small GPT-2s from scratch on the synthetic Physics-of-LMs data (CFG strings, iGSM problems).

The permutation trainer of ``analyses.state_tracking.training`` is specific to state tracking, so the loop is here,
but its checkpoint format is reused (``start_or_resume`` / ``save_checkpoint`` / ``export_model``):
``checkpoint-<step>/`` holds the model, tokenizer, AdamW moments and RNG state, so a killed run resumes
where it stopped with the same batches (the batch of step k depends only on (seed, k)). Plain next-token
loss; for iGSM only the solution is supervised. The final model goes to ``output_dir`` with recipe.json.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from interpkit.errors import UserError
from interpkit.optim import Optimisation
from interpkit.analyses.state_tracking.training import export_model, save_checkpoint, start_or_resume, train_bar

TASKS = ("cfg", "igsm")


@dataclass
class PhysicsTrainConfig(Optimisation):
    """A training run (saved in checkpoints and recipe.json)."""

    task: str = "cfg"
    task_options: dict = field(default_factory=dict)    # CFGConfig / IGSMConfig fields
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 8
    d_mlp: int | None = None
    max_positions: int = 128
    init_std: float = 0.02
    steps: int = 2000                     # Optimisation fields with this trainer's defaults
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    threads: int | None = 1
    output_dir: str | None = None
    save_every: int = 200
    log_every: int = 50
    progress: bool = True

    def validate(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        if self.d_model % self.n_heads:
            raise UserError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")


@dataclass
class LMTask:
    """What the loop needs from a task: a tokenizer and seeded batches (input_ids, attention_mask, labels)."""

    name: str
    tokenizer: object
    batch: Callable[[int, int], dict]          # (n, seed) -> tensors
    info: dict = field(default_factory=dict)


def make_task(name: str, options: dict) -> LMTask:
    if name == "cfg":
        from interpkit.tasks.cfg import CFGConfig, build_tokenizer, encode, random_grammar, sample

        g = random_grammar(CFGConfig(**options))
        return LMTask("cfg", build_tokenizer(g.terminals), lambda n, seed: encode(sample(g, n, seed)),
                      info={"grammar": g})
    from interpkit.tasks.igsm import IGSMConfig, build_tokenizer, encode_problems, sample_problems

    icfg = IGSMConfig(**options)
    tok = build_tokenizer(icfg)
    return LMTask("igsm", tok, lambda n, seed: encode_problems(sample_problems(icfg, n, seed), tok),
                  info={"config": icfg})


def build_model(cfg: PhysicsTrainConfig, tokenizer):
    import transformers as T

    conf = T.GPT2Config(n_layer=cfg.n_layers, n_embd=cfg.d_model, n_head=cfg.n_heads,
                        n_inner=cfg.d_mlp or 4 * cfg.d_model, n_positions=cfg.max_positions, vocab_size=len(tokenizer),
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=cfg.init_std,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(cfg.seed)
    return T.AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa")   # faster on CPU


def _step_loss(model, batch: dict) -> tuple[torch.Tensor, float]:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    with torch.no_grad():
        keep = target != -100
        acc = ((logits.argmax(-1) == target) & keep).sum().item() / max(1, keep.sum().item())
    return loss, acc


def train(cfg: PhysicsTrainConfig, *, resume: bool = True, stop_at: int | None = None):
    """Train (or resume) per ``cfg``; returns (model, tokenizer, history, wall_s)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = make_task(cfg.task, cfg.task_options)
    tok = task.tokenizer
    model, _tok, opt, meta = start_or_resume(cfg, cfg.optimizer, lambda: (build_model(cfg, tok), tok), resume=resume)
    step, history, wall_before = (meta["step"], meta["history"], meta["wall_s"]) if meta else (0, [], 0.0)
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    t0 = time.perf_counter()
    model.train()
    with _bar(cfg.progress, end, step) as bar:
        while step < end:
            batch = task.batch(cfg.batch_size, cfg.seed * 1_000_003 + step)
            loss, acc = _step_loss(model, batch)
            cfg.update(opt, model, loss, step)
            step += 1
            if step % cfg.log_every == 0 or step == end:
                rec = {"step": step, "loss": round(loss.item(), 5), "acc": round(acc, 4),
                       "wall_s": round(wall_before + time.perf_counter() - t0, 1)}
                history.append(rec)
                bar(rec)
            if cfg.output_dir and cfg.save_every and step % cfg.save_every == 0 and step < end:
                _save(cfg, model, tok, opt, step, history, wall_before + time.perf_counter() - t0)
    model.eval()
    wall = wall_before + time.perf_counter() - t0
    if cfg.output_dir:
        _save(cfg, model, tok, opt, step, history, wall)
    return model, tok, history, wall, step


def _save(cfg, model, tok, opt, step, history, wall) -> None:
    import shutil

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / f"checkpoint-{step}", model, tok, opt, cfg, step, history, wall)
    for old in out.glob("checkpoint-*"):
        if old.name != f"checkpoint-{step}":
            shutil.rmtree(old, ignore_errors=True)


def finish_model(cfg: PhysicsTrainConfig, model, tok, step: int, wall: float, history: list,
                 extra: dict, command: str) -> Path:
    """Export the final model + recipe.json into output_dir and drop the checkpoints."""
    import shutil

    out = export_model(cfg.output_dir, model, tok, cfg, step, wall, history, command=command,
                       extra={**extra, "n_params": sum(p.numel() for p in model.parameters())})
    for ck in out.glob("checkpoint-*"):
        shutil.rmtree(ck, ignore_errors=True)
    return out


class _bar:
    """A rich progress bar showing the loss, or a no-op."""

    def __init__(self, on: bool, total: int, start: int) -> None:
        self.on, self.total, self.start = on, total, start

    def __enter__(self):
        if self.on:
            self.p, self.t = train_bar(self.total, self.start)
        return self

    def __call__(self, rec: dict) -> None:
        if self.on:
            self.p.update(self.t, completed=rec["step"], info=f"loss {rec['loss']:.4f} acc {rec['acc']:.3f}")
        else:
            print(f"step {rec['step']} loss {rec['loss']:.4f} acc {rec['acc']:.3f} ({rec['wall_s']}s)", flush=True)

    def __exit__(self, *exc) -> None:
        if self.on:
            self.p.__exit__(*exc)
