"""Known facts for causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT",
ROME; the known_1000 dataset: 1,209 facts a GPT-2 XL completed correctly).

"Vinson Massif is located in the continent of" -> " Antarctica". Roles: subject_first and subject_last
(the subject's first and last token, located by character offsets) and last (the prompt's last token).
meta keeps the record (known_id, subject, attribute, relation_id) and the subject's character span
(subject_chars); its token span is roles subject_first..subject_last.

answer_ids: the first token of " " + attribute as it follows the prompt. Which facts a given model knows
is decided later with the model: ``filter_known(prompts, top1_ids)`` keeps the rows whose greedy next
token is that answer (ROME keeps only those).
"""
from __future__ import annotations

import json

import numpy as np
import torch

from interpkit.errors import UserError
from interpkit.tasks.base import PromptSet
from interpkit.tasks.tokenize import Span, first_token_id, make_prompt_set

SHA256 = "61daca55318bb5260c1e62e133debef9102c7b278bbc7b19dd2ac655543f333a"
FIELDS = ("subject", "attribute", "prompt")


def default_path() -> str:
    """tasks/data/known_1000.json inside the installed package."""
    from pathlib import Path  # local: tasks/ modules keep a minimal import set at module level

    return str(Path(__file__).with_name("data") / "known_1000.json")


def load_known(path: str | None = None) -> list[dict]:
    """The records of known_1000.json (verified by sha256), or of any file of the same format at ``path``.

    A file in the same format is a JSON list of objects with at least subject, attribute and prompt (the
    subject written verbatim in the prompt); known_id and relation_id are kept when present.
    """
    import hashlib  # local, see default_path

    src = path or default_path()
    try:
        raw = open(src, "rb").read()
    except OSError as e:
        raise UserError(f"cannot read facts file {src}: {e.strerror}") from e
    if path is None and hashlib.sha256(raw).hexdigest() != SHA256:
        raise UserError(f"{src} does not match the known_1000.json release (sha256 {SHA256[:12]}...); "
                        "reinstall interpkit, or pass your own file explicitly")
    try:
        records = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{src} is not valid JSON: {e}") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) and all(f in r for f in FIELDS)
                                                 for r in records):
        raise UserError(f"{src} must be a JSON list of objects with fields {', '.join(FIELDS)} "
                        "(the known_1000.json format)")
    return records


def build(tokenizer, n: int | None = None, seed: int = 0, path: str | None = None) -> PromptSet:
    """All facts in file order, or ``n`` of them drawn with ``seed`` (kept in file order)."""
    records = load_known(path)
    idx = range(len(records)) if n is None or n >= len(records) else \
        sorted(np.random.default_rng(seed).choice(len(records), size=n, replace=False).tolist())
    texts, spans, answers = [], [], []
    meta = {"known_id": [], "subject": [], "attribute": [], "relation_id": [], "subject_chars": []}
    for i in idx:
        r = records[i]
        text, subject = r["prompt"], r["subject"]
        a = text.find(subject)
        texts.append(text)
        spans.append({"subject_first": Span(a, a + len(subject), pick="first"),
                      "subject_last": Span(a, a + len(subject)),
                      "last": Span(0, len(text))} if a >= 0 and subject else "subject not in the prompt")
        answers.append([first_token_id(tokenizer, " " + r["attribute"].strip(), prefix=text)])
        for k, v in zip(meta, (r.get("known_id", i), subject, r["attribute"], r.get("relation_id"),
                               (a, a + len(subject)))):
            meta[k].append(v)
    return make_prompt_set(tokenizer, "facts", texts, spans, answers, meta=meta)


def filter_known(prompts: PromptSet, top1_ids: torch.Tensor) -> PromptSet:
    """The rows whose model top-1 next token (``top1_ids``, [N]) equals the answer; dropped rows are counted."""
    top1 = torch.as_tensor(top1_ids).reshape(-1).to(prompts.answer_ids.device)
    if top1.numel() != len(prompts):
        raise UserError(f"filter_known got {top1.numel()} top-1 ids for {len(prompts)} prompts")
    keep = torch.nonzero(top1 == prompts.answer_ids[:, 0]).reshape(-1)
    if keep.numel() == 0:
        raise UserError(f"the model predicts none of the {len(prompts)} facts (top-1 never equals the "
                        "attribute's first token); causal tracing needs facts the model knows")
    out = prompts.subset(keep)
    out.n_filtered = prompts.n_filtered + len(prompts) - keep.numel()
    return out
