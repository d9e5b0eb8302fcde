"""Held-out evaluation of the Physics-of-LMs models: CFG generation accuracy, iGSM solution accuracy."""
from __future__ import annotations

from collections import defaultdict

import torch

_EVAL_SEED = 987_654_321          # fresh data: training seeds are seed * 1_000_003 + step


@torch.no_grad()
def generate_groups(model, prompts: list[list[int]], max_new: int, eos: int, *, sample: bool = False,
                    seed: int = 0) -> list[list[int]]:
    """Continue each prompt (ids) greedily or by sampling; prompts of equal length share a batch (no
    padding, so learned positions stay exact). Returns the new ids, cut after <eos>."""
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    limit = model.config.n_positions
    for length, idx in groups.items():
        ids = torch.tensor([prompts[i] for i in idx])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=sample,
                             max_new_tokens=min(max_new, limit - length), eos_token_id=eos,
                             pad_token_id=eos, top_k=0, temperature=1.0 if sample else None)
        for r, i in enumerate(idx):
            new = gen[r, length:].tolist()
            out[i] = new[:new.index(eos) + 1] if eos in new else new
    return out


def cfg_generation(model, tok, grammar, n: int = 200, seed: int = _EVAL_SEED) -> dict:
    """Sample n strings from <bos> at temperature 1; the fraction the grammar accepts (and diversity)."""
    from interpkit.tasks.cfg import TERMINAL_OFFSET, parse

    model.eval()
    outs = generate_groups(model, [[tok.bos_token_id]] * n, model.config.n_positions, tok.eos_token_id,
                           sample=True, seed=seed)
    ok, ended, strings = 0, 0, set()
    for o in outs:
        if o and o[-1] == tok.eos_token_id:
            ended += 1
            terms = [t - TERMINAL_OFFSET for t in o[:-1]]
            strings.add(tuple(terms))
            ok += parse(grammar, terms).accepted
    return {"n": n, "accepted": ok / n, "ended": ended / n, "distinct": len(strings) / n}


def igsm_accuracy(model, tok, cfg, n: int = 200, seed: int = _EVAL_SEED) -> dict:
    """Greedy solutions of n fresh problems: fraction fully valid with the right answer."""
    from interpkit.tasks.igsm import evaluate_solution, sample_problems

    model.eval()
    probs = sample_problems(cfg, n, seed)
    prompts = [tok.convert_tokens_to_ids(p.tokens[:p.q_end + 1]) for p in probs]
    outs = generate_groups(model, prompts, 100, tok.eos_token_id)
    valid = answer = 0
    for p, pr, o in zip(probs, prompts, outs):
        toks = tok.convert_ids_to_tokens(pr + o)
        ok, stated = evaluate_solution(toks, cfg.p)
        valid += ok
        answer += stated == p.answer
    return {"n": n, "valid_solution": valid / n, "answer_acc": answer / n}


def evaluate_model(cfg, model, tok) -> dict:
    from interpkit.analyses.physics.train import make_task

    task = make_task(cfg.task, cfg.task_options)
    if cfg.task == "cfg":
        return cfg_generation(model, tok, task.info["grammar"])
    return igsm_accuracy(model, tok, task.info["config"])
