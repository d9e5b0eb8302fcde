"""Prompt tasks: each builder turns a tokenizer into a PromptSet, ``build(tokenizer, n=..., seed=...)``.

    from interpkit.tasks import get_task
    prompts = get_task("ioi")(tokenizer, n=128, seed=0)

``corpus()`` is text covering every built-in task's vocabulary; the built-in tiny models' tokenizers are
trained on it (``interpkit.tokenizers``), with ``vocab_words()`` guaranteed to be single tokens.
"""
from __future__ import annotations

from typing import Callable

from interpkit.tasks import calendar, gender_pronoun, greater_than, ioi, known_facts
from interpkit.tasks.base import PromptSet

Builder = Callable[..., PromptSet]


def _permutations(tokenizer, **kw) -> PromptSet:
    """tasks.permutations.build, imported on first use so that a missing module breaks no other task."""
    from interpkit.errors import UserError

    try:
        from interpkit.tasks import permutations
    except ImportError as e:
        raise UserError(f"the permutations task is not available: {e}") from e
    if not hasattr(permutations, "build"):
        raise UserError("tasks.permutations has no build(tokenizer, n=..., seed=...) yet")
    return permutations.build(tokenizer, **kw)


TASKS: dict[str, Builder] = {
    "ioi": ioi.build,
    "gt": greater_than.build,
    "gt-digits": greater_than.build_digits,
    "gp": gender_pronoun.build,
    "days": calendar.build_days,
    "months": calendar.build_months,
    "facts": known_facts.build,
}
# --- permutation state tracking (tasks/permutations.py, maintained separately): registered lazily ---
TASKS["permutations"] = _permutations


def get_task(name: str) -> Builder:
    """The builder registered as ``name``, or for a ``.jsonl`` / ``.csv`` path one that loads that file
    (``tasks.custom``: your own prompts, answers and optional corrupted prompts / wrong answers / subjects)."""
    from interpkit.tasks.custom import builder, is_dataset_path

    if name not in TASKS and is_dataset_path(name):
        return builder(name)
    if name not in TASKS:
        from interpkit.errors import UserError

        raise UserError(f"unknown task {name!r}; use one of: {', '.join(TASKS)}")
    return TASKS[name]


def permutation_strings(n: int) -> list[str]:
    """All permutations of 1..n written as digit strings ("123", "132", ...), in lexicographic order."""
    return _perm_rest([str(d) for d in range(1, n + 1)])


def _perm_rest(digits: list[str]) -> list[str]:
    return [""] if not digits else [d + r for d in digits for r in _perm_rest([x for x in digits if x != d])]


def vocab_words() -> list[str]:
    """Words the built-in tasks need as single tokens after a space (names, nouns, days, ...)."""
    words = ioi.NAMES + gender_pronoun.MALE + gender_pronoun.FEMALE + ["he", "she"] + greater_than.NOUNS
    words += calendar.DAYS + calendar.MONTHS + calendar.NUMBERS + ioi.PLACES + ioi.OBJECTS
    words += [str(xx) for xx in range(10, 21)] + permutation_strings(3) + permutation_strings(5)
    return list(dict.fromkeys(words))


def corpus() -> list[str]:
    """Lines of text covering the vocabulary of every built-in task (deterministic)."""
    lines = []
    names, n_t = ioi.NAMES, len(ioi.BABA_TEMPLATES)
    for i, name in enumerate(names):
        for t in (ioi.BABA_TEMPLATES[i % n_t], ioi.ABBA_TEMPLATES[(i + 3) % n_t]):
            text = t.replace("[S]", name).replace("[IO]", names[(i + 7) % len(names)])
            text = text.replace("[PLACE]", ioi.PLACES[i % len(ioi.PLACES)]).replace("[OBJECT]", ioi.OBJECTS[i % 8])
            lines.append(f"{text} {names[(i + 7) % len(names)]}.")
    for t in gender_pronoun.TEMPLATES:
        for m, f in zip(gender_pronoun.MALE, gender_pronoun.FEMALE):
            lines += [t.format(name=m) + " he?", t.format(name=f) + " she?"]
    for i, noun in enumerate(greater_than.NOUNS):
        lines.append(greater_than.TEMPLATE.format(noun=noun, xx=11 + i % 7, yy=i % 100) + f"{(i * 7) % 100:02d}.")
    for xx in range(10, 21):
        lines.append(" ".join(f"{xx}{yy:02d}" for yy in range(100)))
    for kind, words in (("days", calendar.DAYS), ("months", calendar.MONTHS)):
        lines += [f"{text} {words[c]}." for text, _, _, c, _, _ in calendar.problems(kind)]
    for r in known_facts.load_known():
        lines.append(f"{r['prompt']} {r['attribute']}.")
    for n in (3, 5):
        perms = permutation_strings(n)
        lines += [" ".join(perms[i:] + perms[:i]) for i in range(len(perms))]
    return lines
