"""Tokenize task prompts once and find named spans by character offsets.

Every task builds plain strings and records the character span of each word it cares about. This module
turns them into a ``PromptSet`` for one tokenizer: prompts are encoded with the tokenizer's own special
tokens (a BOS where it adds one), left-padded by hand, and each span becomes a token position through the
offset mapping, so the same task works for byte-level BPE (" John" is one token that includes the space)
and SentencePiece-style tokenizers ("▁John", with a BOS in front) alike.

Rows that do not fit the tokenizer (a name that is two tokens, a corrupted prompt of another length, an
answer that does not tokenize) are dropped and counted in ``PromptSet.n_filtered``; if nothing is left a
``UserError`` says why.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Sequence

import torch

from interpkit.errors import UserError
from interpkit.tasks.base import PromptSet

Offsets = list[tuple[int, int]]


class Span(NamedTuple):
    """Characters [start, end) of a prompt that a role points at.

    pick: which token of the span the role is ("first" or "last").
    token: when set, the span must be exactly this one token id (else the row is filtered).
    """

    start: int
    end: int
    pick: str = "last"
    token: int | None = None


def encode(tokenizer, texts: Sequence[str], special: bool = True) -> tuple[list[list[int]], list[Offsets]]:
    """Token ids and character offsets of each text, unpadded (special tokens get empty offsets)."""
    try:
        enc = tokenizer(list(texts), add_special_tokens=special, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise UserError("tasks need a fast (Rust) tokenizer with offset mappings; "
                        "load the model's tokenizer with use_fast=True") from e
    return enc["input_ids"], [[(int(a), int(b)) for a, b in offs] for offs in enc["offset_mapping"]]


def token_range(offsets: Offsets, start: int, end: int) -> tuple[int, int] | None:
    """(first, last) index of the tokens that overlap characters [start, end), or None."""
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (hits[0], hits[-1]) if hits else None


def text_tokens(tokenizer, text: str, prefix: str | None = None) -> list[int] | None:
    """The token ids that spell ``text`` after ``prefix``; None if a token straddles the two or is unknown.

    By default a text that starts with a space follows the word "a" (so " John" is tokenized as it would
    be mid-sentence, also for SentencePiece tokenizers that treat the start of a string specially), and
    any other text stands at the start of the string.
    """
    if prefix is None:
        prefix = "a" if text[:1].isspace() else ""
    ids, offs = encode(tokenizer, [prefix + text], special=False)
    n = len(prefix)
    inside = [i for i, (a, b) in enumerate(offs[0]) if b > a and b > n]
    if not inside or offs[0][inside[0]][0] < n:
        return None
    toks = [ids[0][i] for i in inside]
    return None if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in toks else toks


def single_token_id(tokenizer, text: str, prefix: str | None = None) -> int | None:
    """The id of ``text`` if it is exactly one token (after ``prefix``, see ``text_tokens``), else None."""
    toks = text_tokens(tokenizer, text, prefix)
    return toks[0] if toks is not None and len(toks) == 1 else None


def first_token_id(tokenizer, text: str, prefix: str | None = None) -> int | None:
    """The id of the first token of ``text`` (after ``prefix``), or None."""
    toks = text_tokens(tokenizer, text, prefix)
    return toks[0] if toks else None


def _locate(ids: list[int], offs: Offsets, spans: dict[str, Span]) -> tuple[dict[str, int] | None, str]:
    """Role name -> token position (unpadded), or (None, reason)."""
    pos = {}
    for role, sp in spans.items():
        rng = token_range(offs, sp.start, sp.end)
        if rng is None:
            return None, f"{role} not found"
        if sp.token is not None and (rng[0] != rng[1] or ids[rng[0]] != sp.token):
            return None, f"{role} is not a single token"
        pos[role] = rng[0] if sp.pick == "first" else rng[1]
    return pos, ""


def _pad_left(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _pad_answers(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def pad_id(tokenizer) -> int:
    """The id used for left padding (pad, else eos, else 0; the attention mask hides it anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def make_prompt_set(
    tokenizer,
    task: str,
    texts: list[str],
    spans: list[dict[str, Span] | str],
    answers: list[list[int | None]],
    wrong: list[list[int | None]] | None = None,
    corrupted: list[str] | None = None,
    meta: dict[str, list] | None = None,
    shifts: dict[str, tuple[str, int]] | None = None,
    n_filtered: int = 0,
) -> PromptSet:
    """Tokenize, locate roles, drop rows that do not fit the tokenizer, left-pad, and build the PromptSet.

    spans[i] maps a role to its character Span in texts[i] (or is a string: the reason the task already
    rejects the row); shifts adds roles relative to others ({"S1+1": ("S1", 1)}). A row is dropped (and
    counted) when a span cannot be located, a ``Span.token`` check fails, an answer is None or missing, or
    its corrupted prompt has another token length.
    """
    ids, offs = encode(tokenizer, texts)
    c_ids = encode(tokenizer, corrupted)[0] if corrupted is not None else None
    keep, roles, why = [], [], Counter()
    for i in range(len(texts)):
        pos, reason = (None, spans[i]) if isinstance(spans[i], str) else _locate(ids[i], offs[i], spans[i])
        if pos is not None:
            for name, (base, k) in (shifts or {}).items():
                pos[name] = pos[base] + k
            if min(pos.values()) < 0 or max(pos.values()) >= len(ids[i]):
                pos, reason = None, "shifted role out of range"
        if pos is None:
            why[reason] += 1
        elif not answers[i] or any(a is None for a in answers[i]) or (
                wrong is not None and any(w is None for w in wrong[i])):
            why["answer does not tokenize"] += 1
        elif c_ids is not None and len(c_ids[i]) != len(ids[i]):
            why["corrupted prompt has another token length"] += 1
        else:
            keep.append(i)
            roles.append(pos)
    n_filtered += len(texts) - len(keep)
    if not keep:
        reasons = ", ".join(f"{k}: {v}" for k, v in why.most_common()) or "no prompts generated"
        raise UserError(f"task {task!r}: no usable prompts for this tokenizer ({n_filtered} filtered; {reasons}); "
                        "use a model whose tokenizer keeps these words whole, or other task options")
    width = max(len(ids[i]) for i in keep)
    pid = pad_id(tokenizer)
    input_ids, mask = _pad_left([ids[i] for i in keep], width, pid)
    role_t = {r: torch.tensor([width - len(ids[i]) + p[r] for i, p in zip(keep, roles)], dtype=torch.long)
              for r in roles[0]}
    c_t, c_mask = _pad_left([c_ids[i] for i in keep], width, pid) if c_ids is not None else (None, None)
    return PromptSet(
        task=task,
        prompts=[texts[i] for i in keep],
        input_ids=input_ids,
        attention_mask=mask,
        answer_ids=_pad_answers([answers[i] for i in keep]),
        wrong_ids=None if wrong is None else _pad_answers([wrong[i] for i in keep]),
        corrupted_prompts=None if corrupted is None else [corrupted[i] for i in keep],
        corrupted_ids=c_t,
        corrupted_mask=c_mask,
        roles=role_t,
        meta={k: [v[i] for i in keep] for k, v in (meta or {}).items()},
        n_filtered=n_filtered,
    )


def fill(template: str, values: dict[str, str]) -> tuple[str, list[tuple[str, int, int]]]:
    """Fill ``[KEY]`` slots left to right; returns the text and (key, start, end) of every filled slot."""
    out, slots, i = [], [], 0
    while True:
        j = template.find("[", i)
        if j < 0:
            out.append(template[i:])
            break
        k = template.index("]", j)
        out.append(template[i:j])
        start = sum(map(len, out))
        value = values[template[j + 1:k]]
        out.append(value)
        slots.append((template[j + 1:k], start, start + len(value)))
        i = k + 1
    return "".join(out), slots
