"""Greater-Than (Hanna, Liu & Variengien 2023, "How does GPT-2 compute greater-than?", arXiv 2305.00586).

"The war lasted from the year 1732 to the year 17" -> a two-digit continuation greater than 32.
A year is usable when " XXYY" is exactly the two tokens " XX" + "YY" for this tokenizer (as for GPT-2);
the centuries are XX = 11..17 and YY = 02..98 (so that both a smaller and a larger answer exist), cycled so
the set is balanced over YY. The corrupted prompt writes the year as XX01 ("01" is the smallest usable
YY, so the model has no reason to prefer any particular continuation).

answer_ids: the two-digit tokens "YY'" for YY' > YY; wrong_ids: those <= YY (both after " XX").
Roles: noun (its last token), XX1 (the century in the year), YY, end (the final " XX").
The nouns are the paper's list of event nouns; nouns that are one token are preferred.
"""
from __future__ import annotations

import numpy as np

from interpkit.tasks.base import PromptSet
from interpkit.tasks.tokenize import Span, make_prompt_set, single_token_id, text_tokens

NOUNS = [
    "abduction", "accord", "affair", "agreement", "appraisal", "assaults", "assessment", "attack", "attempts",
    "campaign", "captivity", "case", "challenge", "chaos", "clash", "collaboration", "coma", "competition",
    "confrontation", "consequence", "conspiracy", "construction", "consultation", "contact", "contract",
    "convention", "cooperation", "custody", "deal", "decline", "decrease", "demonstrations", "development",
    "disagreement", "disorder", "dispute", "domination", "dynasty", "effect", "effort", "employment", "endeavor",
    "engagement", "epidemic", "evaluation", "exchange", "existence", "expansion", "expedition", "experiments",
    "fall", "fame", "flights", "friendship", "growth", "hardship", "hostility", "illness", "impact",
    "imprisonment", "improvement", "incarceration", "increase", "insurgency", "invasion", "investigation",
    "journey", "kingdom", "marriage", "modernization", "negotiation", "notoriety", "obstruction", "operation",
    "order", "outbreak", "outcome", "overhaul", "patrols", "pilgrimage", "plague", "plan", "practice", "process",
    "program", "progress", "project", "pursuit", "quest", "raids", "reforms", "reign", "relationship",
    "retaliation", "riot", "rise", "rivalry", "romance", "rule", "sanctions", "shift", "siege", "slump",
    "stature", "stint", "strikes", "study", "test", "testing", "tests", "therapy", "tour", "tradition", "treaty",
    "trial", "trip", "unemployment", "voyage", "warfare", "work",
]
CENTURIES = range(11, 18)
YEAR_ENDS = range(2, 99)
TEMPLATE = "The {noun} lasted from the year {xx}{yy:02d} to the year {xx}"


def _two_digit_ids(tokenizer, xx: int) -> list[int | None]:
    """Token id of "00".."99" as it follows " XX" (None where that is not one token)."""
    return [single_token_id(tokenizer, f"{y:02d}", prefix=f" {xx}") for y in range(100)]


def _splits(tokenizer, xx: int, yy: int, digits: list[int | None]) -> bool:
    """Whether " XXYY" is the two tokens " XX" + "YY" (checked mid-sentence, after "year")."""
    toks = text_tokens(tokenizer, f" {xx}{yy:02d}", prefix="year")
    return toks is not None and len(toks) == 2 and toks[1] == digits[yy] and \
        toks[0] == single_token_id(tokenizer, f" {xx}", prefix="year")


def valid_years(tokenizer) -> list[int]:
    """Years XXYY (XX in 11..17, YY in 02..98) that this tokenizer splits as " XX" + "YY", with XX01 too."""
    out = []
    for xx in CENTURIES:
        digits = _two_digit_ids(tokenizer, xx)
        if _splits(tokenizer, xx, 1, digits):
            out += [xx * 100 + yy for yy in YEAR_ENDS if _splits(tokenizer, xx, yy, digits)]
    return out


def build(tokenizer, n: int = 256, seed: int = 0) -> PromptSet:
    """``n`` prompts balanced over YY = 02..98; a YY with no valid year for this tokenizer is filtered."""
    rng = np.random.default_rng(seed)
    years = valid_years(tokenizer)
    if not years and digits_apply(tokenizer):
        from interpkit.errors import UserError

        raise UserError("task gt: this tokenizer spells years digit by digit; use --task gt-digits")
    single = [w for w in NOUNS if single_token_id(tokenizer, " " + w) is not None]
    nouns = single or NOUNS
    digits = {xx: _two_digit_ids(tokenizer, xx) for xx in CENTURIES}
    texts, corrupted, spans, answers, wrong = [], [], [], [], []
    meta = {"noun": [], "year": [], "XX": [], "YY": []}
    for i in range(n):
        yy = YEAR_ENDS[i % len(YEAR_ENDS)]
        pool = [y for y in years if y % 100 == yy]
        xx = pool[int(rng.integers(len(pool)))] // 100 if pool else CENTURIES[0]
        noun = nouns[int(rng.integers(len(nouns)))]
        text = TEMPLATE.format(noun=noun, xx=xx, yy=yy)
        corrupted.append(TEMPLATE.format(noun=noun, xx=xx, yy=1))
        y0 = text.index(" from the year ") + len(" from the year ")
        spans.append({"noun": Span(4, 4 + len(noun)), "XX1": Span(y0, y0 + 2), "YY": Span(y0 + 2, y0 + 4),
                      "end": Span(len(text) - 2, len(text))} if pool else "no year XXYY splits into ' XX' + 'YY'")
        texts.append(text)
        answers.append([t for t in digits[xx][yy + 1:] if t is not None])
        wrong.append([t for t in digits[xx][:yy + 1] if t is not None])
        for k, v in zip(meta, (noun, xx * 100 + yy, xx, yy)):
            meta[k].append(v)
    return make_prompt_set(tokenizer, "gt", texts, spans, answers, wrong, corrupted, meta)


# -- the digit-level variant, for tokenizers that spell numbers digit by digit (Llama-3, SmolLM, Gemma) --
DIGIT_TENS = range(1, 9)
"""Tens digits a of YY = 10a + b with a smaller and a larger tens digit both available."""


def _digit_ids(tokenizer, xx: int) -> list[int | None]:
    """Token id of each digit "0".."9" as it follows " XX" (None where that is not one token)."""
    return [single_token_id(tokenizer, str(d), prefix=f"the year {xx}") for d in range(10)]


def digits_apply(tokenizer) -> bool:
    """Whether this tokenizer writes years digit by digit (" 1732" ends in the tokens "1" "7" "3" "2")."""
    toks = text_tokens(tokenizer, " 1732", prefix="year")
    return toks is not None and len(toks) >= 4 and all(single_token_id(tokenizer, d, prefix="17") is not None
                                                       for d in "0123456789")


def build_digits(tokenizer, n: int = 256, seed: int = 0) -> PromptSet:
    """Greater-Than at the tens digit: "... from the year 1732 to the year 17" -> next token a digit.

    With YY = 10a + b, every year ending in a tens digit d > a is later and every d < a earlier, while
    d = a is ambiguous (it depends on the units). answer_ids: the digits d > a; wrong_ids: d < a; the
    metric (``logit_diff``) is the mean logit of the first minus that of the second. YY cycles over the
    tens digits 1..8 (and units 0..9) so the set is balanced; the corrupted year is XX01 (tens digit 0).
    """
    if not digits_apply(tokenizer):
        from interpkit.errors import UserError

        raise UserError("task gt-digits: this tokenizer keeps two-digit years whole; use --task gt")
    rng = np.random.default_rng(seed)
    single = [w for w in NOUNS if single_token_id(tokenizer, " " + w) is not None]
    nouns = single or NOUNS
    texts, corrupted, spans, answers, wrong = [], [], [], [], []
    meta = {"noun": [], "year": [], "XX": [], "YY": []}
    for i in range(n):
        a, b = DIGIT_TENS[i % len(DIGIT_TENS)], (i // len(DIGIT_TENS)) % 10
        yy, xx = 10 * a + b, CENTURIES[int(rng.integers(len(CENTURIES)))]
        noun = nouns[int(rng.integers(len(nouns)))]
        text = TEMPLATE.format(noun=noun, xx=xx, yy=yy)
        y0 = text.index(" from the year ") + len(" from the year ")
        digits = _digit_ids(tokenizer, xx)
        texts.append(text)
        corrupted.append(TEMPLATE.format(noun=noun, xx=xx, yy=1))
        spans.append({"noun": Span(4, 4 + len(noun)), "XX1": Span(y0, y0 + 2), "YY": Span(y0 + 2, y0 + 4),
                      "end": Span(len(text) - 1, len(text))})
        answers.append([t for t in digits[a + 1:] if t is not None])
        wrong.append([t for t in digits[:a] if t is not None])
        for k, v in zip(meta, (noun, xx * 100 + yy, xx, yy)):
            meta[k].append(v)
    return make_prompt_set(tokenizer, "gt-digits", texts, spans, answers, wrong, corrupted, meta)
