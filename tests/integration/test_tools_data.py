"""Your own data (issue 16): JSONL/CSV loading with line-numbered errors and drop counts, multi-token answers
scored by summed teacher-forced log-probability, and a JSONL of multi-token answers through patching and
causal tracing (on the shipped synthetic-facts model, which really recalls its facts)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interpkit.analyses.tools.scoring import answer_logprobs
from interpkit.errors import UserError
from interpkit.tasks import get_task
from interpkit.tasks.custom import read_dataset
from tests.conftest import tiny

FACTS_MODEL = Path(__file__).resolve().parents[2] / "artifacts" / "models" / "synthetic-facts-gpt2"


def write(path: Path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


ROWS = [{"prompt": "When Mary and John went to the store, John gave a drink to", "answer": "Mary Poppins", "label": "ioi",
         "wrong_answer": "John", "corrupted_prompt": "When Mary and John went to the store, Mary gave a drink to"},
        {"prompt": "Then, Alice and Kate had a long argument. Afterwards Kate said to", "answer": "Alice",
         "wrong": "Kate", "corrupted": "Then, Alice and Kate had a long argument. Afterwards Alice said to"},
        {"prompt": "The Eiffel Tower is in", "answer": " Paris", "wrong_answer": "Rome",
         "corrupted_prompt": "The Colosseum of the city is in"}]


@pytest.mark.parametrize("bad, message", [
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "a" "answer": "b"}'], r"line 2: not valid JSON"),
    (['{"prompt": "a", "answer": "b"}', '', '{"prompt": "a"}'], r"line 3: missing field 'answer'"),
    (['{"prompt": "a", "answer": 3}'], r"line 1: field 'answer' must be a string"),
    (['["a", "b"]'], r"line 1: expected a JSON object"),
    (['{"prompt": "a", "answer": "b", "wrong": "c", "wrong_answer": "d"}'], r"line 1: field 'wrong_answer' given twice"),
    ([''], r"has no rows"),
])
def test_malformed_jsonl_rows_name_their_line(tmp_path, bad, message):
    path = write(tmp_path / "d.jsonl", bad)
    with pytest.raises(UserError, match=message):
        read_dataset(path, tiny("gpt2").tokenizer)


def test_csv_errors_and_formats(tmp_path):
    tok = tiny("gpt2").tokenizer
    (tmp_path / "d.csv").write_text('prompt,answer\n"The cat sat on the",mat\nonly one field\n')
    with pytest.raises(UserError, match=r"line 3: missing field 'answer'"):
        read_dataset(str(tmp_path / "d.csv"), tok)
    (tmp_path / "e.csv").write_text('prompt,answer\nThe cat, sat,mat,extra\n')
    with pytest.raises(UserError, match=r"line 2: more values than header"):
        read_dataset(str(tmp_path / "e.csv"), tok)
    with pytest.raises(UserError, match="use a .jsonl or .csv"):
        read_dataset(str(tmp_path / "d.txt"), tok)
    with pytest.raises(UserError, match="cannot read dataset"):
        read_dataset(str(tmp_path / "missing.jsonl"), tok)
    # the same rows as CSV and as JSONL give the same PromptSet
    (tmp_path / "f.csv").write_text('prompt,answer,wrong_answer\n"When Mary and John went to the store, John gave a '
                                    'drink to",Mary,John\n')
    j = write(tmp_path / "f.jsonl", [{"prompt": ROWS[0]["prompt"], "answer": "Mary", "wrong_answer": "John"}])
    a, _ = read_dataset(str(tmp_path / "f.csv"), tok)
    b, _ = read_dataset(j, tok)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.answer_ids, b.answer_ids)


def test_rows_kept_dropped_and_multi_token_answers(tmp_path):
    lm = tiny("gpt2")
    ps, rep = read_dataset(write(tmp_path / "d.jsonl", ROWS), lm.tokenizer)
    assert (rep.rows, rep.kept) == (3, 2)
    assert rep.dropped == {"corrupted prompt has another token length": 1}
    assert rep.multi_token_answers == 1 and "kept 2 of 3 rows" in rep.line()
    assert ps.corrupted_ids.shape == ps.input_ids.shape and ps.meta["line"] == [1, 2]
    assert ps.meta["label"] == ["ioi", None]                                  # other fields are kept
    mary = lm.tokenizer(" Mary Poppins", add_special_tokens=False)["input_ids"]
    assert ps.meta["answer_seq"][0] == mary and len(mary) > 1 and ps.answer_ids[0, 0] == mary[0]
    assert ps.wrong_ids[1, 0] == lm.tokenizer(" Kate", add_special_tokens=False)["input_ids"][0]
    assert torch.equal(ps.roles["end"], torch.full((2,), ps.input_ids.shape[1] - 1))
    # get_task takes a dataset path as a task (how patch / causal-trace / every analysis read --dataset)
    assert torch.equal(get_task(str(tmp_path / "d.jsonl"))(lm.tokenizer, n=None).input_ids, ps.input_ids)
    with pytest.raises(UserError, match="no corrupted_prompt field"):
        read_dataset(write(tmp_path / "p.jsonl", [{"prompt": "a b", "answer": "c"}]), lm.tokenizer, need_pairs=True)
    subj = write(tmp_path / "s.jsonl", [{"prompt": "The Eiffel Tower is in", "answer": "Paris", "subject": "Louvre"}])
    with pytest.raises(UserError, match="1 subject not in the prompt"):
        read_dataset(subj, lm.tokenizer)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_teacher_forced_logprob_equals_a_per_row_reference(tmp_path, family):
    lm = tiny(family)
    ps, _ = read_dataset(write(tmp_path / "d.jsonl", ROWS), lm.tokenizer)
    got = answer_logprobs(lm, ps)
    for i in range(len(ps)):                     # each row alone, unpadded, plain HF forward
        keep = ps.attention_mask[i].bool()
        seq = ps.meta["answer_seq"][i]
        ids = torch.cat([ps.input_ids[i][keep], torch.tensor(seq)])[None]
        with torch.no_grad():
            logp = lm.hf(ids).logits[0].float().log_softmax(-1)
        T = int(keep.sum())
        ref = sum(float(logp[T - 1 + j, t]) for j, t in enumerate(seq))
        assert abs(float(got[i]) - ref) < 1e-4, (family, i)
    wrong = answer_logprobs(lm, ps, which="wrong")
    assert wrong.shape == (2,) and torch.isfinite(wrong).all()


def synthetic_jsonl(path: Path, n: int = 4) -> str:
    """Facts of the shipped synthetic-facts model with two-token answers (attribute + one more word) and a
    corrupted prompt about another subject of the same token length."""
    from interpkit.tasks.synthetic_facts import make_facts

    facts = [f for f in make_facts() if f.relation == "city"]
    rows = []
    for f in facts:
        other = next(g for g in facts if len(g.subject) == len(f.subject) and g.attribute != f.attribute)
        rows.append({"prompt": "<bos> " + f.prompt, "answer": f.attribute + " tesk", "wrong_answer": other.attribute,
                     "subject": " ".join(f.subject), "corrupted_prompt": "<bos> " + other.prompt})
        if len(rows) == n:
            break
    return write(path, rows)


@pytest.mark.skipif(not (FACTS_MODEL / "config.json").exists(), reason="synthetic-facts model not shipped")
def test_multi_token_dataset_through_patching_and_causal_tracing(tmp_path):
    from interpkit.analyses.causal_tracing.command import causal_trace_command
    from interpkit.analyses.patching.command import patch_command

    from typer.testing import CliRunner

    from interpkit.cli import app

    data = synthetic_jsonl(tmp_path / "facts.jsonl")
    quiet = lambda *a, **k: None  # noqa: E731
    summary = patch_command(data, str(FACTS_MODEL), site="resid", n=4, root=str(tmp_path), echo=quiet)
    assert summary["pairs"] == 4 and summary["metric_source"] > summary["metric_base"]
    # the same through the CLI: --dataset, --dtype, --out
    out = CliRunner().invoke(app, ["patch", "--dataset", data, "--model", str(FACTS_MODEL), "--site", "mlp", "--n", "4",
                                   "--dtype", "float32", "--out", str(tmp_path / "cli")])
    assert out.exit_code == 0, out.output
    assert list((tmp_path / "cli" / "patching").iterdir())
    res = causal_trace_command(str(FACTS_MODEL), facts=4, kind="hidden", task=data, samples=2, window=1,
                               root=str(tmp_path), echo=quiet)
    assert len(res.facts) == 4
    assert (Path(tmp_path) / "causal_tracing").is_dir()


def test_load_options_apply_to_every_model():
    from interpkit.load_options import load_options
    from interpkit.models import load_model

    with load_options("bfloat16", "cpu"):
        lm = load_model("tiny:neox")
    assert next(lm.hf.parameters()).dtype == torch.bfloat16
    assert next(load_model("tiny:neox").hf.parameters()).dtype == torch.float32     # only inside the block
    with pytest.raises(UserError, match="unknown --dtype"):
        with load_options("fp8"):
            pass


PAIRS = [{"prompt": "When Mary and John went to the store, John gave a drink to",
          "corrupted_prompt": "When Mary and John went to the store, Mary gave a drink to",
          "answer": "Mary Smith", "wrong_answer": "John Smith"},
         {"prompt": "When Anna and Paul went to the park, Paul gave a ball to",
          "corrupted_prompt": "When Anna and Paul went to the park, Anna gave a ball to",
          "answer": "Anna", "wrong_answer": "Paul and the dog"}]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("site", ["resid_pre", "mlp_out"])
def test_multi_token_patching_is_the_summed_logprob_difference(tmp_path, family, site):
    """Patching with multi-token answers: the base and source metrics are the teacher-forced summed
    log-probability of the answer minus the wrong answer (checked against the scoring tool), and the
    default engine equals the plain full-forward engine on every cell (``mlp_out``: the last layer's
    write at the last prompt position reaches the first answer token's logits, so it is not skipped)."""
    from interpkit.analyses.patching.sweep import PatchConfig, run_patching
    from interpkit.tasks.base import append_tokens

    lm = tiny(family)
    ps, rep = read_dataset(write(tmp_path / "pairs.jsonl", PAIRS), lm.tokenizer)
    assert len(ps) == 2 and ps.multi_token, rep.line()

    def logprob(corrupted: bool, which: str) -> torch.Tensor:      # plain HF forward, all logits
        inputs, ans = append_tokens(ps.batch(corrupted=corrupted), ps.sequences(which))
        T = ps.input_ids.shape[1]
        with torch.no_grad():
            logp = lm.hf(**inputs).logits.float().log_softmax(-1)
        return torch.stack([sum(logp[b, T - 1 + j, t] for j, t in enumerate(row.tolist()) if t >= 0)
                            for b, row in enumerate(ans)])

    fast = run_patching(lm, ps, PatchConfig(site=site))
    slow = run_patching(lm, ps, PatchConfig(site=site, engine="full"))
    clean, corrupt = logprob(False, "answer") - logprob(False, "wrong"), logprob(True, "answer") - logprob(True, "wrong")
    assert torch.allclose(fast.source, clean, atol=1e-4) and torch.allclose(fast.base, corrupt, atol=1e-4)
    assert torch.allclose(slow.base, fast.base, atol=1e-4) and torch.allclose(slow.source, fast.source, atol=1e-4)
    assert fast.values.shape == (2, lm.arch.n_layers, ps.input_ids.shape[1])
    assert (fast.values - slow.values).abs().max() < 1e-4
    assert not torch.allclose(fast.values, fast.base[:, None, None].expand_as(fast.values))   # cells moved
    with pytest.raises(UserError, match="summed log-probability"):
        run_patching(lm, ps, PatchConfig(site="resid_pre", metric="prob_diff"))


FACT_ROWS = [{"prompt": "The Eiffel Tower is located in the city of", "answer": "Paris, France", "subject": "Eiffel Tower"},
             {"prompt": "Danielle Darrieux speaks the language", "answer": "French", "subject": "Danielle Darrieux"}]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_multi_token_causal_tracing_scores_the_whole_answer(tmp_path, family):
    """Causal tracing with a multi-token answer traces the probability of the whole answer: the clean
    score equals exp(summed teacher-forced log-probability) of the scoring tool, both engines agree on
    every restoration, and restoring layer 0's output from the subject on gives the clean score."""
    import math

    from interpkit.analyses.causal_tracing.trace import TraceConfig, run_causal_tracing

    lm = tiny(family)
    ps, _ = read_dataset(write(tmp_path / "facts.jsonl", FACT_ROWS), lm.tokenizer, need_subject=True)
    assert ps.multi_token
    cfg = dict(samples=3, window=2, kinds=["hidden", "mlp"], severed=True)
    fast = run_causal_tracing(lm, ps, TraceConfig(**cfg), subject_std=0.5)
    slow = run_causal_tracing(lm, ps, TraceConfig(**cfg, engine="batched"), subject_std=0.5)
    want = answer_logprobs(lm, ps).double().exp()
    for f, g, w, seq in zip(fast.facts, slow.facts, want, ps.meta["answer_seq"]):
        assert math.isclose(f.high, float(w), rel_tol=1e-4) and math.isclose(g.high, f.high, rel_tol=1e-5)
        assert f.answer_id == seq[0] and f.scores.shape[1] == len(f.tokens)     # restorations on the prompt
        assert torch.allclose(f.scores, g.scores, rtol=1e-4, atol=0)       # relative: random weights, tiny p
        assert (f.scores != f.low).any()
    def everything(fact):               # layer 0's output at every noised-or-later position, answer tokens too
        end = len(fact.ids) + len(ps.meta["answer_seq"][fact.index]) - 1
        return [(tuple((0, "hidden", p, "clean") for p in range(fact.subject_first, end)),)]

    from interpkit.analyses.causal_tracing.trace import facts_of, trace_facts

    restored = trace_facts(lm, facts_of(ps), TraceConfig(**cfg), 0.5, answers=ps.sequences("answer"),
                           restorations=everything)
    for t, f in zip(restored, fast.facts):
        assert math.isclose(float(t.scores.flatten()[0]), f.high, rel_tol=1e-4)
        assert not math.isclose(f.low, f.high, rel_tol=1e-3)
