"""Indirect Object Identification (Wang et al. 2022, "Interpretability in the Wild", arXiv 2211.00593).

"When Mary and John went to the store, John gave a drink to" -> " Mary". The name repeated in the second
clause is the subject S (mentions S1 and S2), the other is the indirect object IO, the answer.
BABA templates mention S first ("When John and Mary ..."), ABBA templates mention IO first.

The templates, the 89 names and the places/objects follow the paper's dataset (as used again by Franco &
Crovella 2025); they are facts of that dataset, written out here.

Corrupted prompts (``corrupt=``), each with the same token length as its clean prompt:
- ``"abc"`` (default): S2 is replaced by a third name C, so the second clause no longer says who is the
  subject (the "ABC" baseline of Wang et al., applied to S2 only).
- ``"flip"``: S2 is replaced by IO ("... Mary gave a drink to"), so the right answer becomes S; the
  logit difference IO - S changes sign (the clean/corrupted pairs used in most patching tutorials).
- ``"swap"``: the first clause's two names trade places (BABA <-> ABBA); the answer is unchanged and only
  positional information differs.

Roles: IO, S1, S2 (the names), end (last prompt token, the one before the answer), and the neighbours
IO-1, IO+1, S1-1, S1+1, S2-1, S2+1, end-1. answer_ids = IO, wrong_ids = S.
"""
from __future__ import annotations

import numpy as np

from interpkit.errors import UserError
from interpkit.tasks.base import PromptSet
from interpkit.tasks.tokenize import Span, fill, make_prompt_set, single_token_id

# Written in BABA form: [S] first. The prompt stops before the final " [IO]" (the answer).
BABA_TEMPLATES = [
    "Then, [S] and [IO] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [S] and [IO] had a lot of fun at the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [S] and [IO] were working at the [PLACE]. [S] decided to give a [OBJECT] to",
    "Then, [S] and [IO] were thinking about going to the [PLACE]. [S] wanted to give a [OBJECT] to",
    "Then, [S] and [IO] had a long argument, and afterwards [S] said to",
    "After [S] and [IO] went to the [PLACE], [S] gave a [OBJECT] to",
    "When [S] and [IO] got a [OBJECT] at the [PLACE], [S] decided to give it to",
    "When [S] and [IO] got a [OBJECT] at the [PLACE], [S] decided to give the [OBJECT] to",
    "While [S] and [IO] were working at the [PLACE], [S] gave a [OBJECT] to",
    "While [S] and [IO] were commuting to the [PLACE], [S] gave a [OBJECT] to",
    "After the lunch, [S] and [IO] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Afterwards, [S] and [IO] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [S] and [IO] had a long argument. Afterwards [S] said to",
    "The [PLACE] [S] and [IO] went to had a [OBJECT]. [S] gave it to",
    "Friends [S] and [IO] found a [OBJECT] at the [PLACE]. [S] gave it to",
]


def _swap_first(template: str) -> str:
    """The first [S] and the first [IO] trade places (BABA <-> ABBA)."""
    return template.replace("[S]", "[X]", 1).replace("[IO]", "[S]", 1).replace("[X]", "[IO]", 1)


ABBA_TEMPLATES = [_swap_first(t) for t in BABA_TEMPLATES]

NAMES = [
    "Adam", "Alan", "Alex", "Alice", "Amy", "Anderson", "Andre", "Andrew", "Andy", "Anna", "Anthony",
    "Arthur", "Austin", "Brian", "Carter", "Charles", "Charlie", "Christian", "Christopher", "Clark", "Cole",
    "Collins", "Daniel", "David", "Dean", "Edward", "Elizabeth", "Eric", "Eva", "Ford", "Frank", "George",
    "Georgia", "Graham", "Grant", "Henry", "Ian", "Jack", "Jacob", "James", "Jane", "Jason", "Jay", "John",
    "Jonathan", "Jordan", "Joseph", "Justin", "Kate", "Kelly", "Kevin", "Laura", "Leon", "Lewis", "Lisa",
    "Louis", "Luke", "Marco", "Marcus", "Maria", "Mark", "Martin", "Mary", "Matthew", "Max", "Michael",
    "Morgan", "Patrick", "Paul", "Peter", "Prince", "Richard", "River", "Robert", "Roman", "Rose", "Ruby",
    "Russell", "Ryan", "Sarah", "Scott", "Simon", "Stephen", "Steven", "Taylor", "Thomas", "Victoria",
    "Warren", "William",
]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]

TEMPLATE_SETS = {"mixed": None, "baba": BABA_TEMPLATES, "abba": ABBA_TEMPLATES}
CORRUPTIONS = ("abc", "flip", "swap")
SHIFTS = {"IO-1": ("IO", -1), "IO+1": ("IO", 1), "S1-1": ("S1", -1), "S1+1": ("S1", 1),
          "S2-1": ("S2", -1), "S2+1": ("S2", 1), "end-1": ("end", -1)}


def _templates(kind: str) -> list[tuple[str, str]]:
    """(template, order) pairs; "mixed" = all BABA and all ABBA templates."""
    if kind not in TEMPLATE_SETS:
        raise UserError(f"unknown IOI templates {kind!r}; use one of: {', '.join(TEMPLATE_SETS)}")
    if kind == "mixed":
        return [(t, "BABA") for t in BABA_TEMPLATES] + [(t, "ABBA") for t in ABBA_TEMPLATES]
    return [(t, kind.upper()) for t in TEMPLATE_SETS[kind]]


def _corrupt_template(template: str, corrupt: str) -> str:
    """The template of the corrupted prompt: S2 -> [C] ("abc") / [IO] ("flip"), or the first clause swapped."""
    head, sep, tail = template.rpartition("[S]")  # the last [S] is S2
    if corrupt == "abc":
        return head + "[C]" + tail
    if corrupt == "flip":
        return head + "[IO]" + tail
    return _swap_first(head) + sep + tail


def _name_spans(slots: list[tuple[str, int, int]], io_id: int | None, s_id: int | None) -> dict[str, Span]:
    """Spans of IO, S1 and S2, each required to be exactly its name's token."""
    spans = {}
    for key, a, b in slots:
        if key == "IO":
            spans["IO"] = Span(a, b, token=io_id)
        elif key == "S":
            spans["S2" if "S1" in spans else "S1"] = Span(a, b, token=s_id)
    return spans


def build(tokenizer, n: int = 256, seed: int = 0, templates: str = "mixed", corrupt: str = "abc") -> PromptSet:
    """``n`` IOI prompts (fewer if some do not fit the tokenizer; see n_filtered), deterministic in seed."""
    if corrupt not in CORRUPTIONS:
        raise UserError(f"unknown IOI corruption {corrupt!r}; use one of: {', '.join(CORRUPTIONS)}")
    pool = _templates(templates)
    ids = {name: single_token_id(tokenizer, " " + name) for name in NAMES}
    rng = np.random.default_rng(seed)
    texts, corrupted, spans, answers, wrong = [], [], [], [], []
    meta = {k: [] for k in ("template", "order", "IO", "S", "C", "place", "object")}
    for _ in range(n):
        t, order = pool[int(rng.integers(len(pool)))]
        io, s, c = (NAMES[int(j)] for j in rng.choice(len(NAMES), size=3, replace=False))
        values = {"IO": io, "S": s, "C": c,
                  "PLACE": PLACES[int(rng.integers(len(PLACES)))], "OBJECT": OBJECTS[int(rng.integers(len(OBJECTS)))]}
        text, slots = fill(t, values)
        ctext, _ = fill(_corrupt_template(t, corrupt), values)
        sp = _name_spans(slots, ids[io], ids[s])
        sp["end"] = Span(len(text) - 1, len(text))
        if ids[io] is None or ids[s] is None or (corrupt == "abc" and ids[c] is None):
            sp = "a name is not a single token"
        texts.append(text)
        corrupted.append(ctext)
        spans.append(sp)
        answers.append([ids[io]])
        wrong.append([ids[s]])
        for k, v in zip(meta, (BABA_TEMPLATES.index(t) if order == "BABA" else ABBA_TEMPLATES.index(t),
                               order, io, s, c, values["PLACE"], values["OBJECT"])):
            meta[k].append(v)
    meta["corrupt"] = [corrupt] * n
    return make_prompt_set(tokenizer, "ioi", texts, spans, answers, wrong, corrupted, meta, SHIFTS)
