"""The known-fact filter and noise scale: cached per (model, dataset), stopped once enough facts are
known, equal to a full dataset pass."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from interpkit.analyses.causal_tracing import facts as F
from interpkit.analyses.causal_tracing import trace as CT
from interpkit.analyses.causal_tracing import known_facts_scan as K

SHIPPED = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "synthetic-facts-gpt2"


@functools.lru_cache(maxsize=None)
def model_and_facts():
    from interpkit.models import load_model
    from interpkit.tasks.synthetic_facts import make_facts, prompt_set

    lm = load_model(str(SHIPPED))
    return lm, prompt_set(lm.tokenizer, make_facts())


def test_scan_stops_early_caches_and_equals_a_full_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPKIT_CACHE", str(tmp_path))
    lm, prompts = model_and_facts()
    std, top1 = CT.dataset_pass(lm, prompts)
    known = [i for i in range(len(prompts)) if int(top1[i]) == int(prompts.answer_ids[i, 0])]
    sub = F.subject_mask(prompts)

    scan, stats = K.scan_known(lm, prompts, 5, sub, chunk=16, log=lambda line: None)
    assert abs(scan.subject_std - std) < 1e-6
    assert scan.known_rows(prompts.answer_ids)[:5] == known[:5]
    assert stats["scanned"] < len(prompts) and len(scan.top1) == stats["scanned"]       # stopped early
    assert len(list((tmp_path / "known").glob("*.json"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("ran the model although the cache had the answer")

    monkeypatch.setattr(K, "_top1", no_forward)
    monkeypatch.setattr(K, "_subject_std", no_forward)
    lines = []
    again, stats = K.scan_known(lm, prompts, 5, sub, chunk=16, log=lines.append)     # other options: reused
    assert again.top1 == scan.top1 and stats["cached_std"] and stats["scanned"] == 0
    assert any("reused" in line for line in lines)

    monkeypatch.undo()
    monkeypatch.setenv("INTERPKIT_CACHE", str(tmp_path))
    full, stats = K.scan_known(lm, prompts, None, sub, chunk=16, log=lambda line: None)
    assert full.known_rows(prompts.answer_ids) == known and stats["scanned"] == len(prompts) - len(scan.top1)


def test_fingerprints_tell_models_and_datasets_apart():
    from tests.conftest import tiny

    lm, prompts = model_and_facts()
    assert K.model_fingerprint(lm) == K.model_fingerprint(lm)
    assert K.model_fingerprint(lm) != K.model_fingerprint(tiny("gpt2"))
    assert K.dataset_fingerprint(prompts) != K.dataset_fingerprint(prompts.subset(list(range(10))))


@pytest.mark.parametrize("content", ["not json", '{"n_dataset": "x"}', "[]"])
def test_a_broken_cache_file_is_recomputed(tmp_path, content):
    path = tmp_path / "scan.json"
    path.write_text(content)
    assert K.read_cached_scan(path, 10) is None
