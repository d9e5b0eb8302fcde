"""Logit lens (nostalgebraist 2020): the final norm and unembedding applied to the residual stream at every
layer and position, in one trace (one NDIF request).

Row l (0..n_layers-1) reads the residual entering layer l (row 0 = the embeddings); row n_layers is the
residual after the last layer, so it equals the model's own logits (Gemma-2's final soft-cap applied).
Per row and position: the top-k tokens and their probabilities; at the last position: the answer's
probability and rank (its first token) and the logit difference answer - wrong when the task has one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from interpkit.analyses.tools.common import encode, geometry, run_trace, token_labels
from interpkit.analyses.tools.reads import Geometry, first
from interpkit.errors import UserError
from interpkit.metrics import logit_diff
from interpkit.plots import pyplot, save_cropped


@dataclass
class LensResult:
    """Per lens row (0..n_layers) and prompt: top-k at every position, answer statistics at the last one."""

    rows: list[str]                 # "embed", "L1", ..., "out": what row l reads
    top_ids: torch.Tensor           # [rows, B, T, k]
    top_probs: torch.Tensor         # [rows, B, T, k]
    answer_prob: torch.Tensor       # [rows, B] (NaN without answers)
    answer_rank: torch.Tensor       # [rows, B] (0 = top-1; -1 without answers)
    logit_diff: torch.Tensor        # [rows, B] (NaN without wrong answers)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits: torch.Tensor | None = None          # [rows, B, V] last-position lens logits (keep_logits=True)
    model_logits: torch.Tensor | None = None    # [B, V] the model's own last-position logits

    def summary(self) -> list[dict]:
        """Per row: mean answer probability, median rank, mean logit difference over prompts."""
        out = []
        for i, name in enumerate(self.rows):
            rank = self.answer_rank[i].float()
            out.append({"row": name, "answer_prob": float(self.answer_prob[i].mean()),
                        "answer_rank_median": float(rank.median()) if (rank >= 0).all() else float("nan"),
                        "logit_diff": float(self.logit_diff[i].mean())})
        return out


def _lens_logits(model, h: torch.Tensor, softcap: float) -> torch.Tensor:
    logits = model.unembed(model.final_norm(h)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def trace_lens(model, inputs: dict, g: Geometry, k: int, answer: torch.Tensor, wrong: torch.Tensor,
               keep_logits: bool, remote=False):
    """The lens trace. Runs unchanged locally and on NDIF (torch only; small tensors come back)."""
    with model.trace(inputs, remote=remote):
        top_ids, top_probs, a_prob, a_rank, ldiff, kept = (list().save(), list().save(), list().save(),
                                                          list().save(), list().save(), list().save())
        for row in range(g.n_layers + 1):
            h = first(model.layers[row].input) if row < g.n_layers else first(model.layers[g.n_layers - 1].output)
            logits = _lens_logits(model, h, g.softcap)
            probs = logits.softmax(-1)
            p, i = probs.topk(k, dim=-1)
            top_ids.append(i.cpu())
            top_probs.append(p.cpu())
            last = logits[:, -1]
            a = answer[:, :1].clamp_min(0)
            a_logit = last.gather(-1, a)
            a_prob.append(probs[:, -1].gather(-1, a)[:, 0].cpu())
            a_rank.append((last > a_logit).sum(-1).cpu())
            ldiff.append(logit_diff(last, answer, wrong).cpu())
            if keep_logits:
                kept.append(last.detach().cpu())
        final = model.output.logits[:, -1].float().detach().cpu().save()
    return top_ids, top_probs, a_prob, a_rank, ldiff, kept, final


def logit_lens(lm, prompts, k: int = 5, keep_logits: bool = False) -> LensResult:
    """The logit lens of ``prompts`` (strings or a PromptSet; a PromptSet's answers give the answer rows)."""
    if k < 1:
        raise UserError("--top-k must be >= 1")
    inputs = encode(lm, prompts)
    B = inputs["input_ids"].shape[0]
    answer = getattr(prompts, "answer_ids", None)
    wrong = getattr(prompts, "wrong_ids", None)
    has_answer, has_wrong = answer is not None, wrong is not None
    answer = answer if has_answer else torch.zeros(B, 1, dtype=torch.long)
    wrong = wrong if has_wrong else torch.full_like(answer[:, :1], -1)
    g = geometry(lm)
    top_ids, top_probs, a_prob, a_rank, ldiff, kept, final = run_trace(lm, trace_lens, inputs, g, k, answer, wrong,
                                                                       keep_logits)
    nan = torch.full((g.n_layers + 1, B), float("nan"))
    rows = ["embed"] + [f"L{l}" for l in range(1, g.n_layers)] + ["out"]
    return LensResult(rows=rows, top_ids=torch.stack(list(top_ids)), top_probs=torch.stack(list(top_probs)),
                      answer_prob=torch.stack(list(a_prob)) if has_answer else nan,
                      answer_rank=torch.stack(list(a_rank)) if has_answer else torch.full((g.n_layers + 1, B), -1),
                      logit_diff=torch.stack(list(ldiff)) if has_wrong else nan.clone(),
                      input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      logits=torch.stack(list(kept)) if keep_logits else None, model_logits=final)


def plot_lens(res: LensResult, lm, path, prompt: int = 0) -> str:
    """The usual logit-lens figure: rows x positions of one prompt, coloured by the top-1 probability and
    annotated with the top-1 token."""
    plt = pyplot()
    keep = res.attention_mask[prompt].bool()
    ids = res.input_ids[prompt][keep]
    probs = res.top_probs[:, prompt][:, keep, 0].float()
    top = res.top_ids[:, prompt][:, keep, 0]
    R, T = probs.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * T + 2), max(3.0, 0.32 * R + 1.5)))
    im = ax.imshow(probs.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for r in range(R):
        for t in range(T):
            word = lm.tokenizer.decode([int(top[r, t])]).replace("\n", "\\n")[:8]
            ax.text(t, r, word, ha="center", va="center", fontsize=6,
                    color="white" if probs[r, t] > 0.6 else "black")
    ax.set_xticks(range(T), token_labels(lm, ids), rotation=90, fontsize=7)
    ax.set_yticks(range(R), res.rows, fontsize=7)
    ax.set_xlabel("input token (the lens predicts the next one)")
    ax.set_ylabel("residual stream read before layer")
    ax.set_title("logit lens: top-1 token and its probability", fontsize=9)
    fig.colorbar(im, ax=ax, label="top-1 probability")
    return save_cropped(fig, path)


def plot_answer(res: LensResult, path) -> str:
    """Answer probability and logit difference per lens row (mean over prompts)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(res.rows))
    ax.plot(x, res.answer_prob.mean(1).numpy(), marker="o", label="p(answer)")
    ax.set_ylabel("p(answer)")
    ax.set_xticks(list(x), res.rows, rotation=90, fontsize=7)
    if not torch.isnan(res.logit_diff).all():
        ax2 = ax.twinx()
        ax2.plot(x, res.logit_diff.mean(1).numpy(), marker="s", color="tab:red", label="logit diff")
        ax2.set_ylabel("logit diff (answer - wrong)", color="tab:red")
    ax.set_title("logit lens at the last position (mean over prompts)", fontsize=9)
    return save_cropped(fig, path)
