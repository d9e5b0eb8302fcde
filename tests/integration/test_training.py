"""analyses/state_tracking/training.py: schedule, exact resume, evaluation, and the shipped S3 demo model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interpkit.analyses.state_tracking.training import (TrainConfig, cutoff, evaluate, evaluate_length_generalization,
                                latest_checkpoint, make_batch, plot_accuracy, train)
from interpkit.tasks.permutations import build_tokenizer, perm_token_ids, symmetric_group

DEMO = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "s3-demo"


def tiny(tmp: Path | None, **kw) -> TrainConfig:
    base = dict(n_layers=2, d_model=16, n_heads=2, batch_size=8, train_len=6, steps=6, warmup_steps=2,
                eval_every=4, eval_stories=16, log_every=1, progress=False, threads=1, lr=3e-3,
                start_len=2, curriculum_steps=4, output_dir=None if tmp is None else str(tmp))
    return TrainConfig(**{**base, **kw})


def test_schedule_and_curriculum():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, start_len=2, train_len=10,
                      curriculum_steps=50)
    assert cfg.lr_at(0) == pytest.approx(1e-4) and cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3) and cfg.lr_at(100) == pytest.approx(1e-4)
    lens = [cfg.length_at(s) for s in range(60)]
    assert lens[0] == 2 and lens[-1] == 10 and lens == sorted(lens)
    lin = TrainConfig(steps=100, warmup_steps=0, schedule="linear", min_lr_ratio=0.0, lr=1.0)
    assert lin.lr_at(50) == pytest.approx(0.5)
    with pytest.raises(Exception):
        TrainConfig(arch="mamba")


def test_batches_depend_only_on_seed_and_step():
    tok = build_tokenizer(3)
    from interpkit.analyses.state_tracking.training import token_maps
    maps = token_maps(tok, 3)
    cfg = tiny(None)
    a, b = make_batch(cfg, 5, maps), make_batch(cfg, 5, maps)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(make_batch(cfg, 6, maps)[0], a[0])
    ids, labels = a
    # direct_state labels are the state tokens in the same vocabulary
    assert set(labels.unique().tolist()) <= set(perm_token_ids(tok, 3).tolist())


def test_resume_is_bit_identical(tmp_path):
    full = train(tiny(tmp_path / "full"), resume=False)
    part = train(tiny(tmp_path / "part"), resume=False, stop_at=3)
    assert part.step == 3 and latest_checkpoint(tmp_path / "part").name == "checkpoint-3"
    assert not (tmp_path / "part" / "recipe.json").exists()          # interrupted: no final export
    resumed = train(tiny(tmp_path / "part"), resume=True)
    assert resumed.step == 6
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for f in ("config.json", "model.safetensors", "tokenizer.json", "recipe.json"):
        assert (tmp_path / "part" / f).exists()
    recipe = json.loads((tmp_path / "part" / "recipe.json").read_text())
    assert recipe["config"]["seed"] == 0 and recipe["steps_run"] == 6
    # same seed, fresh run: identical; another seed: different
    again = train(tiny(None), resume=False)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in sa.items())
    other = train(tiny(None, seed=1), resume=False)
    assert not torch.equal(other.model.state_dict()["lm_head.weight"], sa["lm_head.weight"])


def test_resume_refuses_other_config(tmp_path):
    train(tiny(tmp_path), resume=False, stop_at=2)
    with pytest.raises(Exception, match="another config"):
        train(tiny(tmp_path, lr=1e-2), resume=True)


def test_neox_with_bos_trains_and_evaluates(tmp_path):
    res = train(tiny(None, arch="neox", steps=3, bos=True), resume=False)
    assert res.tokenizer("123 213")["input_ids"][0] == res.tokenizer.bos_token_id
    ev = evaluate(res.model, res.tokenizer, length=12, n_stories=20)
    assert len(ev["state_acc"]) == 12 and 0 <= ev["min_state_acc"] <= 1
    assert all(p >= s - 1e-6 for p, s in zip(ev["parity_acc"], ev["state_acc"]))   # right state => right parity


def test_cutoff_and_plot(tmp_path):
    assert cutoff([1.0, 0.99, 0.97, 1.0]) == 3
    assert cutoff([1.0, 0.99]) is None
    res = {"state_acc": [1.0, 0.99, 0.5], "parity_acc": [1.0, 1.0, 0.9], "state_cutoff": 3,
           "parity_cutoff": 3, "train_len": 2}
    p = plot_accuracy(res, tmp_path / "acc.png")
    assert p.exists() and p.stat().st_size > 1000


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="shipped demo model not present")
def test_shipped_demo_model_tracks_state():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    recipe = json.loads((DEMO / "recipe.json").read_text())
    T = recipe["config"]["train_len"]
    model = AutoModelForCausalLM.from_pretrained(DEMO)
    tok = AutoTokenizer.from_pretrained(DEMO)
    assert sum(p.numel() for p in model.parameters()) * 4 < 5e6
    assert list(tok.convert_ids_to_tokens(perm_token_ids(tok, 3).tolist())) == list(symmetric_group(3).strings)
    ev = evaluate_length_generalization(model, tok, n=3, train_len=T, n_stories=500, seed=2024)
    assert len(ev["state_acc"]) == 2 * T
    assert ev["min_state_acc_in_train_len"] >= 0.99, ev["state_acc"][:T]


def test_demo_config_is_the_shipped_recipe():
    from dataclasses import asdict

    from interpkit.analyses.state_tracking.training import demo_config

    shipped = TrainConfig.from_dict(json.loads((DEMO / "recipe.json").read_text())["config"])
    mine = demo_config(shipped.output_dir, progress=shipped.progress)
    assert asdict(mine) == asdict(shipped)


def test_train_demo_writes_hf_model_recipe_and_plot(tmp_path):
    from interpkit.analyses.state_tracking.training import train_demo

    r = train_demo(tmp_path, progress=False, n_layers=1, d_model=16, n_heads=2, steps=3, eval_every=3,
                   eval_stories=16, target_acc=None, log_every=1)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "recipe.json", "length_generalization.png"):
        assert (tmp_path / f).exists(), f
    assert not list(tmp_path.glob("checkpoint-*"))
    assert r["steps_run"] == 3 and len(r["length_generalization"]["state_acc"]) == 16
