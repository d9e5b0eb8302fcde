"""V-probes: a frozen model plus a rank-r embedding update and a linear head."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interpkit.analyses.probing.vprobe import VProbeConfig, run_vprobe
from interpkit.errors import UserError
from tests.conftest import calendar_lm

DEMO = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "calendar-demo"



def test_vprobe_reads_a_property_and_leaves_the_model_frozen():
    lm = calendar_lm()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, len(lm.tokenizer), (60, 5), generator=g)
    ids[:, -1] = torch.randint(2, 8, (60,), generator=g)             # the last token is one of 6 words
    labels = ids[:, -1] % 2
    before = {k: v.clone() for k, v in lm.hf.state_dict().items()}
    flags = [p.requires_grad for p in lm.hf.parameters()]
    res = run_vprobe(lm, ids, labels, VProbeConfig(steps=60, lr=3e-2, random_baseline=False), target="last%2")
    assert res.model.train_acc >= 0.95 and res.model.test_acc >= 0.9
    assert res.random is None and res.n_train + res.n_test == 60
    assert all(torch.equal(before[k], v) for k, v in lm.hf.state_dict().items())
    assert [p.requires_grad for p in lm.hf.parameters()] == flags
    assert res.trainable_params == len(lm.tokenizer) * 8 + 8 * 64 + 65 * 2
    df = res.to_dataframe()
    assert list(df["model"]) == ["trained"] and {"train_acc", "test_acc", "chance"} <= set(df.columns)


def test_vprobe_is_deterministic_and_checks_input():
    from interpkit.tasks import get_task

    lm = calendar_lm()
    prompts = get_task("days")(lm.tokenizer).subset(list(range(20)))
    labels = torch.tensor(prompts.meta["b"])
    cfg = VProbeConfig(steps=10, random_baseline=False)
    a, b = run_vprobe(lm, prompts, labels, cfg), run_vprobe(lm, prompts, labels, cfg)
    assert (a.model.train_acc, a.model.test_acc) == (b.model.train_acc, b.model.test_acc)
    with pytest.raises(UserError):
        run_vprobe(lm, prompts, labels[:5], cfg)


@pytest.mark.skipif(not DEMO.exists(), reason="artifacts/models/calendar-demo not built")
def test_vprobe_answer_on_trained_model_beats_random_init():
    from interpkit.models import load_model
    from interpkit.tasks import get_task

    lm = load_model(str(DEMO))
    prompts = get_task("months")(lm.tokenizer)
    res = run_vprobe(lm, prompts, torch.tensor(prompts.meta["c"]), VProbeConfig(steps=60, lr=3e-2), target="c")
    assert res.model.test_acc >= 0.9
    assert res.random is not None and res.random.test_acc <= res.model.test_acc - 0.3
