"""Modular arithmetic on days and months (Engels et al. 2024, "Not All Language Model Features Are
Linear", arXiv 2405.14860).

days:   "Let's do some days of the week math. Two days from Monday is" -> " Wednesday"
        7 start days x durations 1..7 = 49 problems.
months: "Let's do some calendar math. Four months from March is" -> " July"
        12 start months x durations 1..12 = 144 problems (the paper writes "months" also after "One").

meta: a = start index, b = duration, c = answer index ((a + b) mod p), with the words.
answer_ids: the first token of " " + answer word; wrong_ids: the first tokens of the other p - 1 words.
Roles (by offsets): start (last token of the start word, the paper's a-token), duration (last token of
the number word, the b-token) and end (the final " is"). There are no corrupted prompts: the paper's
analyses (circle probes, interventions) work on clean activations.
"""
from __future__ import annotations

import numpy as np

from interpkit.tasks.base import PromptSet
from interpkit.tasks.tokenize import Span, first_token_id, make_prompt_set

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBERS = ["One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten", "Eleven", "Twelve"]
DAY_PROMPT = "Let's do some days of the week math. {number} {unit} from {start} is"
MONTH_PROMPT = "Let's do some calendar math. {number} months from {start} is"


def problems(kind: str) -> list[tuple[str, int, int, int, tuple[int, int], tuple[int, int]]]:
    """(prompt, a, b, c, number span, start span) for every problem of "days" or "months", unshuffled."""
    words = DAYS if kind == "days" else MONTHS
    p, out = len(words), []
    for a in range(p):
        for b in range(1, p + 1):
            number = NUMBERS[b - 1]
            if kind == "days":
                text = DAY_PROMPT.format(number=number, unit="day" if b == 1 else "days", start=words[a])
            else:
                text = MONTH_PROMPT.format(number=number, start=words[a])
            i = text.index(f" {number} ") + 1
            j = text.rindex(words[a])
            out.append((text, a, b, (a + b) % p, (i, i + len(number)), (j, j + len(words[a]))))
    return out


def _build(tokenizer, kind: str, n: int | None, seed: int) -> PromptSet:
    words = DAYS if kind == "days" else MONTHS
    first = [first_token_id(tokenizer, " " + w, prefix="is") for w in words]
    rows = problems(kind)
    order = np.random.default_rng(seed).permutation(len(rows))[: n if n is not None else len(rows)]
    texts, spans, answers, wrong = [], [], [], []
    meta = {"a": [], "b": [], "c": [], "start": [], "answer": []}
    for j in order.tolist():
        text, a, b, c, num, start = rows[j]
        texts.append(text)
        spans.append({"start": Span(*start), "duration": Span(*num), "end": Span(len(text) - 2, len(text))})
        answers.append([first[c]])
        wrong.append([t for k, t in enumerate(first) if k != c and t is not None and t != first[c]])
        for key, v in zip(meta, (a, b, c, words[a], words[c])):
            meta[key].append(v)
    return make_prompt_set(tokenizer, kind, texts, spans, answers, wrong, meta=meta)


def build_days(tokenizer, n: int | None = None, seed: int = 42) -> PromptSet:
    """The 49 weekday problems, shuffled with ``seed`` (42, as in the paper); the first ``n`` if given."""
    return _build(tokenizer, "days", n, seed)


def build_months(tokenizer, n: int | None = None, seed: int = 42) -> PromptSet:
    """The 144 month problems, shuffled with ``seed``; the first ``n`` if given."""
    return _build(tokenizer, "months", n, seed)
