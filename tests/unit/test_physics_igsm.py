"""Issue 18, parts 2.1 / 2.2: iGSM problems, solutions, mistakes, probe labels; the resumable trainer."""
from __future__ import annotations

import random

from interpkit.tasks.igsm import (
    IGSMConfig,
    evaluate_solution,
    sample_problems,
    with_mistake,
)


def _direct_value(pr, q, p):
    """Evaluate quantity q straight from the DAG (independent of the rendered text)."""
    if not pr.operands[q]:
        return pr.values[q]
    a, b = (_direct_value(pr, o, p) for o in pr.operands[q])
    return {"+": (a + b) % p, "-": (a - b) % p, "*": (a * b) % p}[pr.ops[q]]


def test_solutions_evaluate_to_stated_answers():
    cfg = IGSMConfig()
    for pr in sample_problems(cfg, 300, seed=3):
        ok, stated = evaluate_solution(pr.tokens, cfg.p)
        assert ok and stated == pr.answer == _direct_value(pr, pr.question, cfg.p)
        assert set(pr.solution) == pr.necessary                   # shortest solution: only necessary steps


def test_wrong_solutions_are_caught():
    cfg = IGSMConfig()
    caught = 0
    for pr in sample_problems(cfg, 100, seed=4):
        t = list(pr.tokens)
        i = t.index("ans") - 2                                   # the last step's result
        t[i] = str((int(t[i]) + 1) % cfg.p)
        caught += not evaluate_solution(t, cfg.p)[0]
    assert caught == 100


def test_mistakes_with_retry_still_solve():
    cfg = IGSMConfig()
    rng = random.Random(0)
    made = 0
    for pr in sample_problems(cfg, 60, seed=5):
        m = with_mistake(pr, rng, cfg.p)
        if m is None:
            continue
        made += 1
        assert "[BACK]" in m.tokens
        j = m.tokens.index("[BACK]")
        assert m.tokens[j - 1] == "."
        assert m.tokens[j + 1:] == pr.tokens[len(pr.tokens) - len(m.tokens) + j + 1:]   # then the true solution
        assert evaluate_solution(m.tokens, cfg.p) == (True, pr.answer)
    assert made > 30


def test_probe_labels():
    from interpkit.analyses.physics.igsm_probe import mistake_pairs, probe_items

    cfg = IGSMConfig()
    probs = sample_problems(cfg, 50, seed=6)
    seqs, labels = probe_items(probs, "nece@question", seed=0)
    for s, y, pr in zip(seqs, labels, probs):
        assert s[-3] == "<p>" and s[-1] == "</p>" and s[-4] == ":"
        assert y == int(pr.names.index(s[-2]) in pr.necessary)
    seqs, labels = probe_items(probs, "value@solution", seed=0)
    assert all(0 <= y < cfg.p for y in labels)
    for right, wrong in mistake_pairs(cfg, 20, seed=1):
        assert right[-1] == wrong[-1] == "." and right != wrong and len(right) == len(wrong)
