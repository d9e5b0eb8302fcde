"""analyses/causal_tracing/noise.py on a tiny model: sigma rules and --replace reuse the same draws, subject
replacement is exact, and the CLI's fact-file and noise options (the model-free checks are
tests/unit/test_causal_noise.py)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from interpkit.analyses.causal_tracing import trace as CT
from interpkit.analyses.causal_tracing.noise import build_noise_model
from tests.conftest import tiny


def test_sigma_rules_and_replace_reuse_the_additive_draws():
    lm = tiny("gpt2")
    from interpkit.tasks.known_facts import build

    ps = build(lm.tokenizer, n=12, seed=3)
    f = CT.facts_of(ps)[0]
    d = lm.arch.d_model
    add_cfg = CT.TraceConfig(noise="3sigma", samples=4)
    level = CT.noise_level(lm, ps, add_cfg)
    additive = CT.fact_noise(add_cfg, f, d, level)
    rep_cfg = CT.TraceConfig(noise="3sigma", samples=4, replace=True)
    rep = CT.fact_noise(rep_cfg, f, d, CT.noise_level(lm, ps, rep_cfg))
    assert rep.shape == additive.shape[:-1] + (d + 1,) and torch.all(rep[..., -1] == 1)
    assert torch.allclose(rep[..., :d], additive, rtol=1e-5, atol=0)            # same draws, same level
    u = CT.fact_noise(CT.TraceConfig(noise="u0.5", samples=50), f, d,
                      build_noise_model(lm, ps, CT.TraceConfig(noise="u0.5")))
    assert u.abs().max() <= 0.5 and u.abs().max() > 0.45 and u.shape[-1] == d


@pytest.mark.parametrize("engine", ["batched", "prefix"])
def test_replace_puts_exactly_another_subjects_embedding_in(engine):
    """The corrupted rows see another subject's token embeddings bit for bit: their answer probability
    equals a plain forward of the prompt with the subject's tokens swapped for that subject's."""
    from interpkit.tasks.known_facts import build

    lm = tiny("gpt2")
    ps = build(lm.tokenizer, n=40, seed=5)
    cfg = CT.TraceConfig(noise="subject", samples=3, kinds=["hidden"], engine=engine)
    model = build_noise_model(lm, ps, cfg)
    table = lm.hf.get_input_embeddings().weight.detach()
    f = next(f for f in CT.facts_of(ps) if f.subject_last > f.subject_first)   # a multi-token subject
    own = tuple(f.ids[f.subject_first:f.subject_last + 1].tolist())
    n = len(own)
    draw = CT.fact_noise(cfg, f, lm.arch.d_model, model)
    swapped = []
    for s in range(cfg.samples):
        hits = [ids for ids in model.pool_ids
                if len(ids) >= n and torch.equal(table[list(ids[:n])], draw[s, :, :-1])]
        assert hits and all(ids != own for ids in hits), "not another subject's embedding"
        swapped.append(hits[0][:n])
    assert len(set(swapped)) > 1                                                # samples use different subjects
    res = CT.run_causal_tracing(lm, ps.subset([f.index]), cfg, noise=model)
    with torch.no_grad():
        ids = f.ids[None].repeat(cfg.samples, 1)
        ids[:, f.subject_first:f.subject_last + 1] = torch.tensor(swapped)
        probs = lm.hf(input_ids=ids).logits[:, -1].softmax(-1)[:, res.facts[0].answer_id]
    assert abs(res.facts[0].low - float(probs.double().mean())) < 1e-6


def _known_file(tmp_path, lm, n_try=120):
    """A known_1000-format file of prompts whose attribute is the tiny model's own top-1 (so it 'knows' them)."""
    from interpkit.tasks.known_facts import load_known

    records = []
    for r in load_known()[:n_try]:
        ids = lm.tokenizer(r["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(lm.hf(input_ids=ids).logits[0, -1].argmax())
        word = lm.tokenizer.decode([top]).strip()
        if word and lm.tokenizer.encode(" " + word, add_special_tokens=False)[:1] == [top]:
            records.append({**r, "attribute": word})
    records += load_known()[n_try:n_try + 20]                                  # some it does not know
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    return path, len(records) - 20


def test_cli_fact_file_noise_rules_and_bad_input(tmp_path, monkeypatch, capsys):
    from interpkit import cli

    lm = tiny("gpt2")
    path, n_known = _known_file(tmp_path, lm)
    assert n_known >= 2

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["interpkit", "causal-trace", *args])
        with pytest.raises(SystemExit) as e:
            cli.main()
        return e.value.code, capsys.readouterr()

    common = ["--model", "tiny:gpt2", "--fact-file", str(path), "--facts", "2", "--kind", "hidden",
              "--samples", "2", "--root", str(tmp_path / "runs")]
    code, out = run(*common, "--noise", "m")
    assert code == 0, out.err
    assert f"traced 2 known facts (of {n_known + 20})" in out.out
    code, out = run(*common, "--replace")
    assert code == 0, out.err
    manifest = json.loads(next((tmp_path / "runs" / "causal_tracing").glob("*/manifest.json")).read_text())
    assert manifest
    code, out = run(*common, "--noise", "t1")
    assert code == 2 and out.err.startswith("error: bad --noise") and len(out.err.strip().splitlines()) == 1
    code, out = run(*common[:3], str(tmp_path / "missing.json"), *common[4:])
    assert code == 2 and "cannot read facts file" in out.err
