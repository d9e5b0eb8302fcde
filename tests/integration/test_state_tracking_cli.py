"""Seed 000 fidelity: topic-model data, parity / next_token supervision, bfloat16, early stopping,
--save-every, eval --skip-layers / --random-baseline / --lengthwise, and mixed lengths / positions."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from interpkit.errors import UserError
from interpkit.analyses.state_tracking.training import (TrainConfig, token_maps, evaluate, make_batch, random_position_ids,
                                skipped_layers, step_length, train)
from interpkit.tasks.permutations import build_tokenizer, data_command, load_topic_mapping, sample_stories, symmetric_group

DEMO = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "s3-demo"


def tiny(tmp: Path | None = None, **kw) -> TrainConfig:
    base = dict(n_layers=1, d_model=16, n_heads=2, batch_size=8, train_len=6, steps=6, warmup_steps=1,
                eval_every=2, eval_stories=16, log_every=1, progress=False, threads=1, lr=3e-3,
                output_dir=None if tmp is None else str(tmp))
    return TrainConfig(**{**base, **kw})


def _cli(monkeypatch, capsys, *args):
    from interpkit import cli

    monkeypatch.setattr(sys, "argv", ["interpkit", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def test_topic_data_follows_the_topic_model(tmp_path):
    paths = data_command(str(tmp_path / "t"), kind="topic", stories=1500, length=100, seed=1, train_ratio=0.9)
    with np.load(paths["train"]) as tr, np.load(paths["test"]) as te:
        assert tr["words"].shape[1] == 100 and len(tr["words"]) + len(te["words"]) == 1500
        tw, theta, words = tr["topic_word"], tr["doc_topic"].astype(np.float64), tr["words"]
        assert tw.shape == (4, 6) and np.allclose(tw.sum(1), 1) and float(tr["alpha"]) == 0.3
        expected = theta.mean(0) @ tw                         # pooled word distribution of the generator
        observed = np.bincount(words.reshape(-1), minlength=6) / words.size
        assert np.abs(observed - expected).max() < 0.02
        # alpha = 0.3: a story concentrates on few topics, so its words are far from the pooled mix
        per_story = np.stack([np.bincount(w, minlength=6) / 100 for w in words[:200]])
        assert np.abs(per_story - expected).sum(1).mean() > 0.3


def test_topic_data_from_a_mapping_file_and_bad_input(tmp_path):
    one_hot = np.eye(6)[[0, 2, 4]].tolist()                     # 3 topics, one permutation each
    f = tmp_path / "mapping.json"
    f.write_text(json.dumps(one_hot))
    paths = data_command(str(tmp_path / "m"), kind="topic", stories=50, length=20, topic_mapping=str(f))
    with np.load(paths["train"]) as z:
        assert set(np.unique(z["words"]).tolist()) <= {0, 2, 4} and z["topic_word"].shape == (3, 6)
    (tmp_path / "story.json").write_text(json.dumps({"story": "...", "topic_mapping_0": one_hot}))
    assert load_topic_mapping(str(tmp_path / "story.json")).shape == (3, 6)
    (tmp_path / "bad.json").write_text(json.dumps([[1, 0, 0]]))
    for kw in ({"kind": "lda"}, {"kind": "topic", "topic_mapping": str(tmp_path / "bad.json")},
               {"kind": "permutations", "topic_mapping": str(f)}, {"kind": "topic", "alpha": 0.0}):
        with pytest.raises(UserError):
            data_command(str(tmp_path / "x"), stories=10, **kw)


def test_data_cli_topic(tmp_path, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "data", "--kind", "topic", "--stories", "20", "--length", "10",
                          "--out", str(tmp_path / "d"))
    assert code == 0 and "train:" in out and (tmp_path / "d" / "train.npz").exists()
    code, out, err = _cli(monkeypatch, capsys, "data", "--kind", "lda", "--out", str(tmp_path / "e"))
    assert code == 2 and err.startswith("error: bad data option") and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# training options
# --------------------------------------------------------------------------------------------------
def test_supervisions_and_batches(tmp_path):
    tok = build_tokenizer(3)
    maps = token_maps(tok, 3)
    f = tmp_path / "mapping.json"
    f.write_text(json.dumps(np.eye(6)[[1, 3]].tolist()))
    ids, labels = make_batch(tiny(supervision="next_token", topic_mapping=str(f)), 0, maps, 6)
    perms = {int(tok.convert_tokens_to_ids(symmetric_group(3).strings[i])) for i in (1, 3)}
    assert set(ids.unique().tolist()) <= perms                  # topic-model stories, not random actions
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == -100).all()
    _, par = make_batch(tiny(supervision="parity"), 0, maps, 6)
    assert set(par.unique().tolist()) <= set(tok.convert_tokens_to_ids(["0", "1"]))
    cfg = tiny(min_len=2, random_positions=20)
    lens = {step_length(cfg, s, 6) for s in range(60)}
    assert lens == {2, 3, 4, 5, 6}
    pos = random_position_ids(cfg, 3, 8, 7)
    assert pos.shape == (8, 7) and (pos.diff(dim=1) > 0).all() and pos.max() < 20 and pos.max() > 7
    with pytest.raises(UserError):
        tiny(positions="none", arch="neox")


def test_next_token_training_learns_the_topic_model():
    res = train(tiny(supervision="next_token", steps=25, eval_every=25, d_model=32, lr=1e-2), resume=False)
    first, last = res.history[0]["loss"], res.history[-1]["val_loss"]
    assert last < np.log(6) - 0.1 and last < first               # better than uniform over the 6 actions


def test_parity_supervision_and_nope_positions():
    res = train(tiny(supervision="parity", positions="none", steps=3), resume=False)
    assert torch.count_nonzero(res.model.transformer.wpe.weight) == 0
    assert not res.model.transformer.wpe.weight.requires_grad
    assert "val_loss" in res.history[-1] and res.final_eval is None


def test_bfloat16_train_and_eval():
    res = train(tiny(dtype="bfloat16", steps=3), resume=False)
    assert next(res.model.parameters()).dtype == torch.float32   # float32 master weights, bf16 compute
    ev32 = evaluate(res.model, res.tokenizer, length=6, n_stories=64)
    ev16 = evaluate(res.model, res.tokenizer, length=6, n_stories=64, dtype="bfloat16")
    d = np.abs(np.array(ev32["p_correct"]) - np.array(ev16["p_correct"]))
    assert 0 < d.max() < 0.05                                     # really computed in bf16, and close


def test_early_stopping_exports_the_best_and_save_every_keeps_all(tmp_path, monkeypatch):
    import interpkit.analyses.state_tracking.training as T

    losses = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.1])
    monkeypatch.setattr(T, "validation_loss", lambda *a, **k: (next(losses), 0.0))
    cfg = tiny(tmp_path, steps=12, patience=2, save_every=2, keep_checkpoints=0)
    res = train(cfg, resume=False)
    assert res.step == 8                                           # evals at 2,4 (best),6,8 -> stop
    steps = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert steps == [2, 4, 6, 8]
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "model.safetensors"))
    best = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-8" / "model.safetensors"))
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert any(not torch.equal(exported[k], last[k]) for k in last)
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["early_stopping"]["best_step"] == 4 and recipe["early_stopping"]["stopped"]


def test_train_cli_from_a_local_hub_style_model(tmp_path, monkeypatch, capsys):
    from tests.conftest import tiny as tiny_lm

    lm = tiny_lm("gpt2")
    lm.hf.save_pretrained(tmp_path / "base")
    lm.tokenizer.save_pretrained(tmp_path / "base")
    code, out, err = _cli(monkeypatch, capsys, "train", "--base-model", str(tmp_path / "base"), "--supervision",
                          "next_token", "--steps", "2", "--batch-size", "4", "--train-len", "6", "--eval-every", "2",
                          "--save-every", "1", "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    assert "next_token validation loss" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    code, out, err = _cli(monkeypatch, capsys, "train", "--supervision", "states", "--output-dir", str(tmp_path / "x"))
    assert code == 2 and "unknown supervision" in err


# --------------------------------------------------------------------------------------------------
# eval options on the shipped model
# --------------------------------------------------------------------------------------------------
def test_skipped_layers_pass_the_residual_through():
    res = train(tiny(n_layers=2, steps=1), resume=False)
    ids = torch.randint(6, 12, (2, 5))
    with torch.no_grad(), skipped_layers(res.model, [0]):
        hs = res.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(hs[1], hs[0])                               # block 0 passed its input through
    with torch.no_grad():                                           # hooks removed afterwards
        hs2 = res.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert not torch.equal(hs2[1], hs2[0]) and torch.equal(hs2[0], hs[0])
    with pytest.raises(UserError):
        with skipped_layers(res.model, [5]):
            pass


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="shipped demo model not present")
def test_eval_cli_skip_layers_random_baseline_and_lengthwise(tmp_path, monkeypatch, capsys):
    base = ["eval", "--model", str(DEMO), "--stories", "120"]
    code, out, err = _cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "a"), "--lengthwise", "2:8:6",
                          "--probe-stories", "60")
    assert code == 0, err
    full = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert full["min_state_acc_in_train_len"] >= 0.98
    lw = full["lengthwise"]
    assert lw["lengths"] == [2, 8] and (tmp_path / "a" / "lengthwise_probe.png").exists()
    assert lw["state_test_acc"][-1][0] >= 0.9                      # last layer, length 2
    assert lw["state_test_acc"][0][-1] < 0.5                       # embeddings cannot know the state at length 8
    assert "first layer with state accuracy" in out
    code, out, err = _cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "b"), "--skip-layers", "3")
    skipped = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert code == 0 and skipped["skip_layers"] == [3] and skipped["min_state_acc_in_train_len"] < 0.9
    code, out, err = _cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "c"), "--random-baseline")
    rnd = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert code == 0 and rnd["random_baseline"] and rnd["mean_state_acc"] < 0.35
    code, out, err = _cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "d"), "--dtype", "bfloat16")
    assert code == 0 and json.loads((tmp_path / "d" / "eval.json").read_text())["min_state_acc_in_train_len"] >= 0.95
    code, out, err = _cli(monkeypatch, capsys, *base, "--skip-layers", "9")
    assert code == 2 and "out of range" in err
    code, out, err = _cli(monkeypatch, capsys, *base, "--lengthwise", "8:2")
    assert code == 2 and "lengthwise" in err


def test_looped_training_exports_an_ordinary_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from interpkit.analyses.state_tracking.training import decoder_layers

    res = train(tiny(tmp_path, arch="neox", rotary_pct=1.0, tie_layers=True, n_layers=3, steps=2, bos=True), resume=False)
    live = decoder_layers(res.model)
    assert live[1] is live[0] and live[2] is live[0]                # one shared block while training
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    blocks = decoder_layers(loaded)
    assert blocks[1] is not blocks[0] and [b.attention.layer_idx for b in blocks] == [0, 1, 2]
    assert all(torch.equal(a, b) for a, b in zip(blocks[0].parameters(), blocks[2].parameters()))
    ids = res.tokenizer(["123 213 321 132 231"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, res.model(input_ids=ids).logits, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# scratchpad: the length-generalising recipe
# --------------------------------------------------------------------------------------------------
SHIPPED = Path(__file__).resolve().parents[2] / "artifacts" / "models"


def test_scratchpad_layout_is_next_token_prediction_of_the_states():
    from interpkit.tasks.permutations import make_labels, run_states, scratchpad_sequence

    st = sample_stories(32, 7, 3, seed=1)
    seq, lab = scratchpad_sequence(st.actions, 3), make_labels(st.actions, 3, "scratchpad")
    assert seq.shape == lab.shape == (32, 14) and (seq[:, 0] == 0).all()          # s_0 = identity
    assert torch.equal(seq[:, 1::2], st.actions) and torch.equal(lab[:, 1::2], st.states)
    assert torch.equal(lab[:, 1:-1:2], seq[:, 2::2])          # each label is the next token of the story
    assert (lab[:, 0::2] == -100).all()
    assert torch.equal(run_states(st.actions, 3), st.states)


def test_scratchpad_generation_matches_text_fed_back_by_hand():
    """``evaluate(scratchpad=True)`` feeds greedy states back; redo it from story text through the tokenizer."""
    from interpkit.analyses.state_tracking.training import state_logits, build_model

    cfg = tiny(supervision="scratchpad", arch="mistral", window=2, bos=True)
    model, tok = build_model(cfg)
    model.eval()
    g = symmetric_group(3)
    st = sample_stories(4, 5, 3, seed=5)
    logits = state_logits(model, tok, st.actions, 3, scratchpad=True)
    state_ids = torch.tensor([tok.convert_tokens_to_ids(s) for s in g.strings])
    for i in range(4):
        text = g.strings[0]
        for t in range(5):
            text += " " + g.strings[int(st.actions[i, t])]
            ids = tok(text, return_tensors="pt").input_ids
            assert ids[0, 0] == tok.bos_token_id
            with torch.no_grad():
                ref = model(input_ids=ids).logits[0, -1, state_ids]
            torch.testing.assert_close(logits[i, t], ref, rtol=1e-5, atol=1e-5)
            text += " " + g.strings[int(ref.argmax())]


def test_scratchpad_with_a_two_token_window_generalises_in_length():
    """Trained at lengths 1..6 for 250 steps; generated states stay right at 3x the training length."""
    cfg = tiny(supervision="scratchpad", arch="mistral", window=2, d_model=32, n_heads=4, batch_size=64,
               steps=250, warmup_steps=20, lr=3e-3, init_std=0.1, min_len=1, eval_every=0)
    res = train(cfg, resume=False)
    ev = evaluate(res.model, res.tokenizer, n=3, length=18, n_stories=300, seed=3, scratchpad=True)
    assert ev["min_state_acc"] >= 0.95, ev["state_acc"]
    teacher = evaluate(res.model, res.tokenizer, n=3, length=18, n_stories=300, seed=3)   # no states shown
    assert teacher["state_acc"][-1] < 0.5                       # without its scratchpad the model cannot do it


@pytest.mark.parametrize("group", [3, 5])
def test_shipped_scratchpad_models_keep_state_at_twice_the_length(group):
    from interpkit.models import load_model
    from interpkit.analyses.state_tracking.training import evaluate_length_generalization

    path = SHIPPED / f"s{group}-scratchpad"
    recipe = json.loads((path / "recipe.json").read_text())["config"]
    assert recipe["supervision"] == "scratchpad" and recipe["n"] == group
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 2_000_000
    lm = load_model(str(path))
    ev = evaluate_length_generalization(lm.hf, lm.tokenizer, n=group, train_len=recipe["train_len"], factor=2,
                                        n_stories=500, seed=11, scratchpad=True)
    assert ev["state_acc"][-1] >= 0.90 and ev["min_state_acc_in_train_len"] >= 0.98


def test_eval_cli_signature_of_the_scratchpad_model(tmp_path, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "eval", "--model", str(SHIPPED / "s3-scratchpad"), "--stories", "200",
                          "--out", str(tmp_path), "--signature", "--lengthwise", "4,8,16", "--probe-stories", "100")
    assert code == 0, err
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["scratchpad"] and res["state_acc"][-1] >= 0.9
    assert res["signature"]["state_probe"][-1] >= 0.95 and res["signature"]["verdict"] == "sequential"
    assert "verdict: sequential" in out
    assert res["lengthwise"]["state_first_layer"] == [1, 1, 1]      # one layer at every length: a one-step update


def test_window_needs_mistral(monkeypatch, capsys, tmp_path):
    code, out, err = _cli(monkeypatch, capsys, "train", "--output-dir", str(tmp_path / "m"), "--window", "2")
    assert code == 2 and "needs arch mistral" in err and "Traceback" not in err
