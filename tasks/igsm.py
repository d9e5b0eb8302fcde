"""iGSM-style grade-school-math problems (Physics of Language Models 2.1 / 2.2), cut down.

A problem is a random dependency DAG over named quantities (one-token names): leaves get a number,
every other quantity is ``x = y op z`` (op in + - *) of earlier-created ones, all modulo a small prime.
The statements are shuffled (the order of creation is hidden), then comes the question and a
step-by-step solution that computes only the *necessary* quantities (ancestors of the question) in the
canonical order "the ready quantity whose statement comes first":

    <bos> f = 3 . b = f * d . d = 5 . k = b + f . ? k : f = 3 . d = 5 . b = f * d = 3 * 5 = 1 . k = b + f = 1 + 3 = 4 . ans 4 <eos>

``Problem`` keeps the structure (operands, values, necessary set, dependency closure) and the token
positions of the question end and of each solution step's end, which the probes cut at.
``with_mistake`` (part 2.2) inserts a wrong step -- a necessary quantity computed before its operands
are known -- followed by ``[BACK]``, then the solution continues correctly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from interpkit import validate as V

SPECIALS = ["<pad>", "<bos>", "<eos>", "=", "+", "-", "*", ".", "?", ":", "ans", "<p>", "</p>", "[BACK]"]
NAMES = list("abcdefghijklmnopqrstuvwxyz")
OPS = ("+", "-", "*")


@dataclass
class IGSMConfig:
    """Size of the problems. Defaults: 7 quantities (3 leaves), arithmetic mod 7."""

    n_vars: int = 7
    n_leaves: int = 3
    p: int = 7
    n_names: int = 26
    seed_offset: int = 0

    def __post_init__(self) -> None:
        V.in_range("n_names", self.n_names, 1, len(NAMES))
        V.in_range("n_vars", self.n_vars, 2, self.n_names)
        V.in_range("n_leaves", self.n_leaves, 1, self.n_vars, high_open=True)
        V.at_least("p (a prime)", self.p, 2)


@dataclass
class Problem:
    names: list[str]                         # quantity i's name
    operands: list[tuple[int, ...]]          # () for leaves
    ops: list[str | None]
    values: list[int]
    order: list[int]                         # statement order (indices of quantities)
    question: int
    necessary: set[int]
    depends: list[set[int]]                  # transitive operands of each quantity
    solution: list[int]                      # quantities in solution order
    tokens: list[str] = field(default_factory=list)
    q_end: int = 0                           # token index of ":" (end of question)
    stmt_end: int = 0                        # token index of the last statement's "."
    step_ends: list[int] = field(default_factory=list)   # token index of each step's "."
    answer: int = 0

    def text(self) -> str:
        return " ".join(self.tokens)


def _apply(op: str, a: int, b: int, p: int) -> int:
    return (a + b) % p if op == "+" else (a - b) % p if op == "-" else (a * b) % p


def step_tokens(pr: Problem, i: int, vals: dict[int, int] | None = None, p: int = 7) -> list[str]:
    """Tokens of the step computing quantity i (operand values from ``vals``, default the true ones)."""
    vals = vals or {}
    if not pr.operands[i]:
        return [pr.names[i], "=", str(pr.values[i]), "."]
    a, b = pr.operands[i]
    va, vb = vals.get(a, pr.values[a]), vals.get(b, pr.values[b])
    return [pr.names[i], "=", pr.names[a], pr.ops[i], pr.names[b], "=", str(va), pr.ops[i], str(vb), "=",
            str(_apply(pr.ops[i], va, vb, p)), "."]


def sample_problem(cfg: IGSMConfig, rng: random.Random) -> Problem:
    n = cfg.n_vars
    names = rng.sample(NAMES[:cfg.n_names], n)
    operands: list[tuple[int, ...]] = []
    ops: list[str | None] = []
    values: list[int] = []
    for i in range(n):
        if i < cfg.n_leaves:
            operands.append(())
            ops.append(None)
            values.append(rng.randrange(cfg.p))
        else:
            a, b = rng.sample(range(i), 2) if i >= 2 else (0, 0)
            op = rng.choice(OPS)
            operands.append((a, b))
            ops.append(op)
            values.append(_apply(op, values[a], values[b], cfg.p))
    depends: list[set[int]] = []
    for i in range(n):
        d: set[int] = set()
        for o in operands[i]:
            d |= {o} | depends[o]
        depends.append(d)
    question = n - 1
    necessary = {question} | depends[question]
    order = list(range(n))
    rng.shuffle(order)
    rank = {q: r for r, q in enumerate(order)}
    done: set[int] = set()
    solution = []
    while len(solution) < len(necessary):
        ready = [q for q in necessary - done if all(o in done for o in operands[q])]
        nxt = min(ready, key=rank.__getitem__)
        solution.append(nxt)
        done.add(nxt)
    pr = Problem(names, operands, ops, values, order, question, necessary, depends, solution)
    render(pr, cfg.p)
    return pr


def render(pr: Problem, p: int, mistake: tuple[int, int, dict] | None = None) -> None:
    """Fill tokens and positions. ``mistake`` = (before step index, wrong quantity, fake operand values)."""
    t = ["<bos>"]
    for q in pr.order:
        if pr.operands[q]:
            a, b = pr.operands[q]
            t += [pr.names[q], "=", pr.names[a], pr.ops[q], pr.names[b], "."]
        else:
            t += [pr.names[q], "=", str(pr.values[q]), "."]
    pr.stmt_end = len(t) - 1
    t += ["?", pr.names[pr.question], ":"]
    pr.q_end = len(t) - 1
    pr.step_ends = []
    for j, q in enumerate(pr.solution):
        if mistake is not None and mistake[0] == j:
            t += step_tokens(pr, mistake[1], mistake[2], p) + ["[BACK]"]
        t += step_tokens(pr, q, None, p)
        pr.step_ends.append(len(t) - 1)
    pr.answer = pr.values[pr.question]
    t += ["ans", str(pr.answer), "<eos>"]
    pr.tokens = t


def sample_problems(cfg: IGSMConfig, n: int, seed: int = 0) -> list[Problem]:
    rng = random.Random(seed * 7919 + cfg.seed_offset)
    return [sample_problem(cfg, rng) for _ in range(n)]


def wrong_step(pr: Problem, j: int, rng: random.Random, p: int) -> tuple[int, dict] | None:
    """A quantity that is necessary but not ready before step j (an operand not yet computed), with
    random values for its unknown operands; None when every remaining quantity is ready."""
    done = set(pr.solution[:j])
    cands = [q for q in pr.necessary - done if pr.operands[q] and not all(o in done for o in pr.operands[q])]
    if not cands:
        return None
    q = rng.choice(cands)
    fake = {o: rng.randrange(p) for o in pr.operands[q] if o not in done}
    return q, fake


def with_mistake(pr: Problem, rng: random.Random, p: int) -> Problem | None:
    """A copy whose solution has one wrong (not-ready) step followed by [BACK]; None if impossible."""
    import copy

    js = [j for j in range(len(pr.solution)) if wrong_step(pr, j, random.Random(0), p) is not None]
    if not js:
        return None
    j = rng.choice(js)
    q, fake = wrong_step(pr, j, rng, p)
    out = copy.copy(pr)
    render(out, p, (j, q, fake))
    out.mistake_at = j                                                     # type: ignore[attr-defined]
    return out


# ------------------------------------------------------------------------------------------------
# checking and tokens
# ------------------------------------------------------------------------------------------------
def evaluate_solution(tokens: list[str], p: int) -> tuple[bool, int | None]:
    """Re-derive every value from the text alone: statements define quantities, each solution step
    must use the stated operation on previously computed values. Returns (all steps valid, answer)."""
    if ":" not in tokens:
        return False, None
    q_end = tokens.index(":")
    stmts, known = {}, {}
    body = tokens[1:q_end - 2]
    i = 0
    while i < len(body):
        end = body.index(".", i)
        st = body[i:end]
        stmts[st[0]] = st[2:]
        i = end + 1
    sol = tokens[q_end + 1:]
    i, ok = 0, True
    while i < len(sol) and sol[i] != "ans":
        if "." not in sol[i:]:
            return False, None
        end = sol.index(".", i)
        st = sol[i:end]
        i = end + 1
        if i < len(sol) and sol[i] == "[BACK]":
            i += 1
            continue
        name, rhs = st[0], stmts.get(st[0])
        if rhs is None:
            return False, None
        if len(rhs) == 1:
            ok &= st[2:] == rhs
            known[name] = int(rhs[0])
        else:
            a, op, b = rhs
            if a not in known or b not in known:
                return False, None
            va, vb = known[a], known[b]
            val = _apply(op, va, vb, p)
            ok &= st[2:] == [a, op, b, "=", str(va), op, str(vb), "=", str(val)]
            known[name] = val
    qname = tokens[q_end - 1]
    stated = int(sol[i + 1]) if i + 1 < len(sol) and sol[i + 1].isdigit() else None
    return bool(ok and qname in known and stated == known[qname]), stated


def build_tokenizer(cfg: IGSMConfig):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIALS + [str(v) for v in range(cfg.p)] + NAMES[:cfg.n_names]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   model_max_length=4096, clean_up_tokenization_spaces=False)


def encode_problems(problems: list[Problem], tokenizer, supervise_question: bool = False) -> dict:
    """Right-padded ids; labels only on the solution (after ":") unless ``supervise_question``."""
    rows = [tokenizer.convert_tokens_to_ids(pr.tokens) for pr in problems]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (r, pr) in enumerate(zip(rows, problems)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        start = 1 if supervise_question else pr.q_end + 1
        labels[i, start:len(r)] = ids[i, start:len(r)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
