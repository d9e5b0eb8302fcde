"""Your own data: a JSONL or CSV file of prompts as a PromptSet, for every analysis that takes prompts.

Fields (one object per JSONL line, or CSV columns with a header row):
  prompt            required; the text the model continues
  answer            required; the continuation scored as correct
  corrupted_prompt  optional; the counterpart for patching (same token length, else the row is dropped)
  wrong_answer      optional; the contrast answer (logit difference answer - wrong)
  subject           optional; a substring of prompt (roles subject_first / subject_last, for causal tracing)
Aliases: ``corrupted`` and ``wrong``. Other fields are kept in ``meta``.

Answers follow the prompt as written: an answer that starts with whitespace, or follows a prompt ending in
whitespace, is used as is; otherwise one space is put in front (``"Paris"`` after ``"... is in"`` is
scored as ``" Paris"``). Answers of several tokens are kept: ``answer_ids`` holds their first token (the
next-token metrics of the analyses) and ``meta["answer_seq"]`` / ``meta["wrong_seq"]`` the whole token
sequence, which ``analyses.tools.scoring.answer_logprobs`` scores by summed teacher-forced log-probability.
Malformed rows stop the load with the file and line number; rows that do not fit the tokenizer are dropped
and counted by reason (``DatasetReport``).
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field

from interpkit.errors import UserError
from interpkit.tasks.base import PromptSet
from interpkit.tasks.tokenize import Span, encode, make_prompt_set, text_tokens

FIELDS = ("prompt", "answer", "corrupted_prompt", "wrong_answer", "subject")
ALIASES = {"corrupted": "corrupted_prompt", "wrong": "wrong_answer"}
REQUIRED = ("prompt", "answer")
SUFFIXES = (".jsonl", ".csv")


@dataclass
class DatasetReport:
    """What a load kept and why it dropped the rest."""

    path: str
    rows: int
    kept: int
    dropped: Counter = field(default_factory=Counter)
    multi_token_answers: int = 0

    def line(self) -> str:
        why = "; ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
        multi = f"; {self.multi_token_answers} multi-token answers kept (summed log-prob)" if self.multi_token_answers else ""
        return f"dataset {self.path}: kept {self.kept} of {self.rows} rows" + (f" (dropped: {why})" if why else "") + multi


def is_dataset_path(name: str) -> bool:
    return str(name).lower().endswith(SUFFIXES)


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs with canonical field names; malformed rows raise UserError naming the line."""
    if not is_dataset_path(path):
        raise UserError(f"unknown dataset format {path!r}; use a .jsonl or .csv file")
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"cannot read dataset {path}: {e.strerror}; pass an existing .jsonl or .csv file") from None
    except UnicodeDecodeError:
        raise UserError(f"dataset {path} is not UTF-8 text; save it as UTF-8") from None
    if str(path).lower().endswith(".jsonl"):
        rows = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {no}: not valid JSON ({e.msg}); write one JSON object per line") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {no}: expected a JSON object with fields prompt, answer, ...")
            rows.append((no, obj))
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise UserError(f"{path}: empty CSV; the first line must be a header with prompt,answer,...")
        rows = []
        for row in reader:
            if None in row:
                raise UserError(f"{path} line {reader.line_num}: more values than header columns; "
                                f"quote fields that contain commas")
            rows.append((reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}))
    if not rows:
        raise UserError(f"dataset {path} has no rows")
    return [(no, _canonical(path, no, obj)) for no, obj in rows]


def _canonical(path: str, no: int, obj: dict) -> dict:
    out = {}
    for key, value in obj.items():
        name = ALIASES.get(key, key)
        if name in out:
            raise UserError(f"{path} line {no}: field {name!r} given twice (as {key!r} too); keep one")
        out[name] = value
    for name in REQUIRED:
        if name not in out or out[name] in (None, ""):
            raise UserError(f"{path} line {no}: missing field {name!r}; every row needs prompt and answer")
    for name in FIELDS:
        if name in out and out[name] is not None and not isinstance(out[name], str):
            raise UserError(f"{path} line {no}: field {name!r} must be a string, got {type(out[name]).__name__}")
    return out


def _answer_text(prompt: str, answer: str) -> str:
    return answer if answer[:1].isspace() or prompt[-1:].isspace() else " " + answer


def load_dataset(path: str, tokenizer, n: int | None = None, seed: int = 0, need_subject: bool = False,
                 need_pairs: bool = False, echo=None) -> PromptSet:
    """``path`` as a PromptSet for ``tokenizer`` (see the module docstring); ``echo`` gets the report line."""
    prompts, report = read_dataset(path, tokenizer, n=n, seed=seed, need_subject=need_subject,
                                   need_pairs=need_pairs)
    if echo is not None:
        echo(report.line())
    return prompts


def read_dataset(path: str, tokenizer, n: int | None = None, seed: int = 0, need_subject: bool = False,
                 need_pairs: bool = False) -> tuple[PromptSet, DatasetReport]:
    """(PromptSet, DatasetReport). ``n`` rows are drawn with ``seed`` (kept in file order) when given."""
    import numpy as np

    rows = read_rows(path)
    if n is not None and n < len(rows):
        pick = sorted(np.random.default_rng(seed).choice(len(rows), size=n, replace=False).tolist())
        rows = [rows[i] for i in pick]
    has_pairs = any("corrupted_prompt" in r for _, r in rows)
    has_wrong = any("wrong_answer" in r for _, r in rows)
    has_subject = any("subject" in r for _, r in rows)
    if need_pairs and not has_pairs:
        raise UserError(f"dataset {path} has no corrupted_prompt field; patching needs clean/corrupted pairs")
    if need_subject and not has_subject:
        raise UserError(f"dataset {path} has no subject field; causal tracing needs the subject of each prompt")
    report = DatasetReport(path=str(path), rows=len(rows), kept=0)
    keep = []
    for no, r in rows:
        reason = None
        if has_pairs and "corrupted_prompt" not in r:
            reason = "without corrupted_prompt (other rows have one)"
        elif has_wrong and "wrong_answer" not in r:
            reason = "without wrong_answer (other rows have one)"
        elif "subject" in r and r["subject"] not in r["prompt"]:
            reason = "subject not in the prompt"
        elif has_subject and "subject" not in r:
            reason = "without subject (other rows have one)"
        if reason:
            report.dropped[reason] += 1
        else:
            keep.append((no, r))
    texts, spans, answers, wrongs, corrupted = [], [], [], [], []
    meta = {"line": [], "answer": [], "answer_seq": [], "wrong_seq": [], "subject": [], "subject_chars": []}
    extra = sorted({k for _, r in keep for k in r} - set(FIELDS) - set(meta))      # e.g. a label to probe
    meta.update({k: [] for k in extra})
    for no, r in keep:
        text = r["prompt"]
        a_seq = text_tokens(tokenizer, _answer_text(text, r["answer"]), prefix=text)
        w_seq = text_tokens(tokenizer, _answer_text(text, r["wrong_answer"]), prefix=text) if has_wrong else []
        if not a_seq or (has_wrong and not w_seq):
            report.dropped["answer does not tokenize after the prompt"] += 1
            continue
        if has_wrong and a_seq[0] == w_seq[0]:
            report.dropped["answer and wrong answer start with the same token"] += 1
            continue
        span = {"end": Span(0, len(text))}
        if "subject" in r:
            a = text.find(r["subject"])
            span.update(subject_first=Span(a, a + len(r["subject"]), pick="first"),
                        subject_last=Span(a, a + len(r["subject"])), last=Span(0, len(text)))
        texts.append(text)
        spans.append(span)
        answers.append([a_seq[0]])
        wrongs.append([w_seq[0]] if has_wrong else [])
        corrupted.append(r.get("corrupted_prompt", ""))
        meta["line"].append(no)
        meta["answer"].append(r["answer"])
        meta["answer_seq"].append(a_seq)
        meta["wrong_seq"].append(w_seq)
        meta["subject"].append(r.get("subject"))
        meta["subject_chars"].append((text.find(r["subject"]), text.find(r["subject"]) + len(r["subject"]))
                                     if "subject" in r else None)
        for k in extra:
            meta[k].append(r.get(k))
    if not texts:
        why = ", ".join(f"{n} {k}" for k, n in report.dropped.most_common())
        raise UserError(f"dataset {path}: no usable rows for this tokenizer ({why}); check the fields")
    if has_pairs:
        c_ids, ids = encode(tokenizer, corrupted)[0], encode(tokenizer, texts)[0]
        fits = [len(a) == len(b) for a, b in zip(ids, c_ids)]
        report.dropped["corrupted prompt has another token length"] += fits.count(False)
        sel = [i for i, ok in enumerate(fits) if ok]
        if not sel:
            raise UserError(f"dataset {path}: no corrupted_prompt has its prompt's token length; patching "
                            f"needs aligned pairs (e.g. swap one single-token word)")
        texts, spans, answers, wrongs, corrupted = ([x[i] for i in sel] for x in (texts, spans, answers, wrongs,
                                                                                   corrupted))
        meta = {k: [v[i] for i in sel] for k, v in meta.items()}
    if not any(subject is not None for subject in meta["subject"]):
        meta.pop("subject")
        meta.pop("subject_chars")
    ps = make_prompt_set(tokenizer, "dataset", texts, spans, answers, wrong=wrongs if has_wrong else None,
                         corrupted=corrupted if has_pairs else None, meta=meta)
    report.dropped.update({"not located by the tokenizer": len(texts) - len(ps)} if len(ps) < len(texts) else {})
    report.dropped = Counter({k: v for k, v in report.dropped.items() if v})
    report.kept = len(ps)
    report.multi_token_answers = sum(len(s) > 1 for s in ps.meta["answer_seq"])
    ps.n_filtered = report.rows - report.kept
    return ps, report


def builder(path: str):
    """A task builder ``(tokenizer, n=..., seed=...) -> PromptSet`` for ``tasks.get_task``."""
    def build(tokenizer, n: int | None = None, seed: int = 0, **kw) -> PromptSet:
        kw.setdefault("echo", print)               # every command that loads a file says what it kept
        return load_dataset(path, tokenizer, n=n, seed=seed, **kw)

    return build
