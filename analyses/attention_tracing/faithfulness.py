"""Faithfulness of a set of heads: mean-ablate every other head and measure the task's logit difference.

Trace code (torch only; runs unchanged on NDIF). A head's output is its slice of the output
projection's input (``head_out``); ablation replaces it, at every position, by its mean over the
prompts' non-padding positions.
"""
from __future__ import annotations

import torch

from interpkit.metrics import logit_diff
from interpkit.sites import site


def head_means(lm, prompts) -> torch.Tensor:
    """Mean head output [L, H, d_head] over prompts and non-padding positions (one trace)."""
    inputs = prompts.batch()
    L, H = lm.arch.n_layers, lm.arch.n_heads
    mask = inputs["attention_mask"].float()
    with torch.no_grad(), lm.model.trace(inputs, remote=lm.remote):
        outs = list().save()
        for layer in range(L):
            outs.append(site(lm.model, "head_out", layer, H).detach().float().cpu())
    return torch.stack([torch.einsum("bthe,bt->he", z, mask) / mask.sum() for z in outs])


def ablated_logit_diff(lm, prompts, means: torch.Tensor, keep: set) -> float:
    """Mean logit difference with every head not in ``keep`` ((layer, head) pairs) mean-ablated."""
    inputs = prompts.batch()
    L, H = lm.arch.n_layers, lm.arch.n_heads
    drop = {l: [h for h in range(H) if (l, h) not in keep] for l in range(L)}
    wrong = prompts.wrong_ids if prompts.wrong_ids is not None else torch.full_like(prompts.answer_ids, -1)
    model = lm.model
    with torch.no_grad(), model.trace(inputs, remote=lm.remote):
        for layer in range(L):
            if drop[layer]:
                z = site(model, "head_out", layer, H)
                idx = torch.tensor(drop[layer])
                z[:, :, idx] = means[layer, idx].to(z.dtype)
        ld = logit_diff(model.output.logits[:, -1].float(), prompts.answer_ids, wrong).save()
    return float(ld.mean())
