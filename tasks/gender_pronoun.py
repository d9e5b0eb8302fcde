"""Gendered pronouns (Mathwin et al. 2023, "Identifying a preliminary circuit for predicting gendered
pronouns in GPT-2 small"; the task as used by Conmy et al.'s ACDC and Franco & Crovella 2025).

"So John is a really great friend, isn't" -> " he". Five templates x 10 male + 10 female names = 100
prompts (the names and templates of that dataset). The corrupted prompt puts the name of the other gender
with the same list index in its place (John <-> Mary), which flips the answer.

answer_ids: " he" / " she"; wrong_ids: the other pronoun. Roles: name, is (the " is" after the name),
end (the last token, of "isn't").
"""
from __future__ import annotations

import numpy as np

from interpkit.tasks.base import PromptSet
from interpkit.tasks.tokenize import Span, make_prompt_set, single_token_id

TEMPLATES = [
    "So {name} is a really great friend, isn't",
    "So {name} is such a good cook, isn't",
    "So {name} is a very good athlete, isn't",
    "So {name} is a really nice person, isn't",
    "So {name} is such a funny person, isn't",
]
MALE = ["John", "David", "Mark", "Paul", "Ryan", "Gary", "Jack", "Sean", "Carl", "Joe"]
FEMALE = ["Mary", "Lisa", "Anna", "Sarah", "Amy", "Carol", "Karen", "Susan", "Julie", "Judy"]


def build(tokenizer, n: int | None = None, seed: int = 0) -> PromptSet:
    """All 100 prompts in a seeded order (the first ``n`` of them if n is given)."""
    he, she = (single_token_id(tokenizer, p) for p in (" he", " she"))
    rows = [(t, i, g) for t in TEMPLATES for g in ("male", "female") for i in range(len(MALE))]
    order = np.random.default_rng(seed).permutation(len(rows))[: n if n is not None else len(rows)]
    texts, corrupted, spans, answers, wrong = [], [], [], [], []
    meta = {"name": [], "gender": [], "template": [], "corrupted_name": []}
    for j in order.tolist():
        template, i, gender = rows[j]
        name, other = (MALE[i], FEMALE[i]) if gender == "male" else (FEMALE[i], MALE[i])
        text = template.format(name=name)
        a = text.index(name)
        name_id, other_id = single_token_id(tokenizer, " " + name), single_token_id(tokenizer, " " + other)
        ok = name_id is not None and other_id is not None
        spans.append({"name": Span(a, a + len(name), token=name_id), "is": Span(a + len(name) + 1, a + len(name) + 3),
                      "end": Span(len(text) - 1, len(text))} if ok else "a name is not a single token")
        texts.append(text)
        corrupted.append(template.format(name=other))
        answers.append([he if gender == "male" else she])
        wrong.append([she if gender == "male" else he])
        for k, v in zip(meta, (name, gender, TEMPLATES.index(template), other)):
            meta[k].append(v)
    return make_prompt_set(tokenizer, "gp", texts, spans, answers, wrong, corrupted, meta)
