"""Tasks and the local tokenizers: roles point at the right words for BPE and SentencePiece styles."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from interpkit import tasks
from interpkit.errors import UserError
from interpkit.tokenizers import STYLES, build_tokenizer, tokenizer_json
from interpkit.tasks import calendar, known_facts
from interpkit.tasks.tokenize import single_token_id, text_tokens

BUILT_IN = ["ioi", "gt", "gp", "days", "months", "facts"]


@pytest.fixture(scope="module", params=STYLES)
def tok(request):
    return build_tokenizer(request.param)


def word(tok, token_id) -> str:
    return tok.decode([int(token_id)]).strip()


def at(tok, ps, role: str) -> list[str]:
    """The word at ``role`` in every row."""
    pos = ps.roles[role]
    return [word(tok, ps.input_ids[i, pos[i]]) for i in range(len(ps))]


# ---- tokenizers ---------------------------------------------------------------------------------------

def test_tokenizer_vocabulary(tok):
    assert 4000 <= len(tok) <= 8192
    multi = [w for w in tasks.vocab_words() if single_token_id(tok, " " + w) is None]
    assert multi == []
    assert all(single_token_id(tok, f"{y:02d}", prefix=" 17") is not None for y in range(100))
    assert all(single_token_id(tok, p) is not None for p in tasks.permutation_strings(3))   # text start
    assert len(text_tokens(tok, " 1732", prefix="year")) == 2
    assert [word(tok, t) for t in text_tokens(tok, " 1732", prefix="year")] == ["17", "32"]


def test_tokenizer_specials(tok):
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    assert all(getattr(tok, n) is not None for n in names)
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok("So Mary is")["input_ids"]
    sentencepiece = tok.bos_token == "<s>"
    assert (ids[0] == tok.bos_token_id) == sentencepiece
    assert tok.decode(ids, skip_special_tokens=True) == "So Mary is"
    assert tok.decode(tok("héllo ☃")["input_ids"], skip_special_tokens=True) == "héllo ☃"  # bytes survive


def test_tokenizer_cached_deterministic_and_fresh():
    a, b = build_tokenizer("bpe"), build_tokenizer("bpe")
    assert a is not b and a.get_vocab() == b.get_vocab()
    code = ("from interpkit.tokenizers import tokenizer_json; import hashlib; "
            "print(*(hashlib.sha256(tokenizer_json(s).encode()).hexdigest() for s in ('bpe', 'sentencepiece')))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert other == [hashlib.sha256(tokenizer_json(s).encode()).hexdigest() for s in STYLES]
    with pytest.raises(UserError, match="style"):
        build_tokenizer("wordpiece")


# ---- every task on both tokenizers --------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILT_IN)
def test_task_builds(tok, name):
    ps = tasks.get_task(name)(tok)
    assert len(ps) > 0 and ps.n_filtered == 0
    mask = ps.attention_mask
    assert mask[:, -1].all() and (mask.cumsum(1) > 0).long().eq(mask).all()      # left-padded
    assert ((ps.answer_ids >= 0).sum(1) > 0).all()
    for pos in ps.roles.values():
        assert (mask.gather(1, pos[:, None]) == 1).all()                      # roles on real tokens
    if ps.corrupted_ids is not None:
        assert torch.equal(ps.corrupted_mask, ps.attention_mask)            # equal token lengths


def test_ioi_roles(tok):
    ps = tasks.get_task("ioi")(tok, n=64, seed=1)
    assert at(tok, ps, "IO") == ps.meta["IO"]
    assert at(tok, ps, "S1") == ps.meta["S"] == at(tok, ps, "S2")
    assert set(at(tok, ps, "end")) == {"to"}
    assert [word(tok, t) for t in ps.answer_ids[:, 0]] == ps.meta["IO"]
    assert [word(tok, t) for t in ps.wrong_ids[:, 0]] == ps.meta["S"]
    assert torch.equal(ps.roles["S1+1"], ps.roles["S1"] + 1)
    order = torch.tensor([o == "BABA" for o in ps.meta["order"]])
    assert ((ps.roles["S1"] < ps.roles["IO"]) == order).all() and 0 < order.sum() < len(ps)
    s2 = ps.roles["S2"]
    corrupted_s2 = [word(tok, ps.corrupted_ids[i, s2[i]]) for i in range(len(ps))]
    assert corrupted_s2 == ps.meta["C"] and all(c not in (a, b) for a, b, c in
                                                zip(ps.meta["IO"], ps.meta["S"], ps.meta["C"]))


@pytest.mark.parametrize("corrupt", ["flip", "swap"])
def test_ioi_corruptions(tok, corrupt):
    ps = tasks.get_task("ioi")(tok, n=16, corrupt=corrupt)
    r = ps.roles
    rows = range(len(ps))
    if corrupt == "flip":
        assert [word(tok, ps.corrupted_ids[i, r["S2"][i]]) for i in rows] == ps.meta["IO"]
    else:
        assert [word(tok, ps.corrupted_ids[i, r["IO"][i]]) for i in rows] == ps.meta["S"]
        assert [word(tok, ps.corrupted_ids[i, r["S1"][i]]) for i in rows] == ps.meta["IO"]


def test_gt_roles(tok):
    ps = tasks.get_task("gt")(tok, n=97)
    assert at(tok, ps, "XX1") == [str(x) for x in ps.meta["XX"]] == at(tok, ps, "end")
    assert at(tok, ps, "YY") == [f"{y:02d}" for y in ps.meta["YY"]]
    assert sorted(ps.meta["YY"]) == list(range(2, 99))                            # balanced
    assert at(tok, ps, "noun") == ps.meta["noun"]
    for i in (0, 50, 96):
        yy = ps.meta["YY"][i]
        good = [int(word(tok, t)) for t in ps.answer_ids[i] if t >= 0]
        bad = [int(word(tok, t)) for t in ps.wrong_ids[i] if t >= 0]
        assert good == list(range(yy + 1, 100)) and bad == list(range(0, yy + 1))
    assert all(p.endswith(f"{x}01 to the year {x}") for p, x in zip(ps.corrupted_prompts, ps.meta["XX"]))


def test_gp_roles(tok):
    ps = tasks.get_task("gp")(tok)
    assert len(ps) == 100 and at(tok, ps, "name") == ps.meta["name"]
    assert set(at(tok, ps, "is")) == {"is"} and set(at(tok, ps, "end")) == {"'t"}
    pron = [word(tok, t) for t in ps.answer_ids[:, 0]]
    assert pron == ["he" if g == "male" else "she" for g in ps.meta["gender"]]
    name = ps.roles["name"]
    assert [word(tok, ps.corrupted_ids[i, name[i]]) for i in range(100)] == ps.meta["corrupted_name"]


@pytest.mark.parametrize("kind,p", [("days", 7), ("months", 12)])
def test_calendar_roles(tok, kind, p):
    ps = tasks.get_task(kind)(tok)
    assert len(ps) == p * p and ps.wrong_ids.shape[1] == p - 1
    assert at(tok, ps, "start") == ps.meta["start"]
    assert at(tok, ps, "duration") == [calendar.NUMBERS[b - 1] for b in ps.meta["b"]]
    assert set(at(tok, ps, "end")) == {"is"}
    assert [word(tok, t) for t in ps.answer_ids[:, 0]] == ps.meta["answer"]
    assert all((a + b) % p == c for a, b, c in zip(ps.meta["a"], ps.meta["b"], ps.meta["c"]))


def test_facts_roles(tok):
    ps = tasks.get_task("facts")(tok, n=200, seed=3)
    assert len(ps) == 200 and ps.meta["known_id"] == sorted(ps.meta["known_id"])
    first, last = ps.roles["subject_first"], ps.roles["subject_last"]
    for i in range(len(ps)):
        subject = tok.decode(ps.input_ids[i, first[i]:last[i] + 1]).strip()
        assert subject == ps.meta["subject"][i]
        assert ps.prompts[i][slice(*ps.meta["subject_chars"][i])] == subject
        assert ps.meta["attribute"][i].startswith(word(tok, ps.answer_ids[i, 0]))
    assert (ps.roles["last"] == ps.input_ids.shape[1] - 1).all()


# ---- determinism, filtering, data ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ioi", "gt", "gp", "days", "facts"])
def test_seeded(name):
    tk = build_tokenizer("bpe")
    build = tasks.get_task(name)
    a, b, c = build(tk, n=40, seed=5), build(tk, n=40, seed=5), build(tk, n=40, seed=6)
    assert a.prompts == b.prompts and torch.equal(a.input_ids, b.input_ids)
    assert a.prompts != c.prompts


def _word_level(words: list[str]):
    """A whitespace/punctuation word-level tokenizer knowing only ``words`` (others are <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>"] + sorted(set(words)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")


def test_ioi_filters_multi_token_names():
    from interpkit.tasks import ioi

    known = ioi.NAMES[::2]                       # half of the names are unknown (<unk>) words
    words = " ".join(ioi.BABA_TEMPLATES + ioi.PLACES + ioi.OBJECTS).replace("[", " ").replace("]", " ")
    tk = _word_level(words.replace(",", " ").replace(".", " ").split() + known + [",", "."])
    ps = tasks.get_task("ioi")(tk, n=100, seed=0)
    assert 0 < len(ps) < 100 and len(ps) + ps.n_filtered == 100
    assert all(n in known for n in ps.meta["IO"] + ps.meta["S"] + ps.meta["C"])
    assert at(tk, ps, "IO") == ps.meta["IO"]


def test_no_usable_prompts_is_a_user_error():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(tasks.corpus()[:300])))
    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>"] + chars)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")   # one token per character
    char_level = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    for name in ("ioi", "gp"):
        with pytest.raises(UserError, match="not a single token"):
            tasks.get_task(name)(char_level)


def test_known_1000_file(tmp_path, monkeypatch):
    raw = open(known_facts.default_path(), "rb").read()
    assert hashlib.sha256(raw).hexdigest() == known_facts.SHA256
    records = known_facts.load_known()
    assert len(records) == 1209
    own = tmp_path / "mine.json"
    own.write_text(json.dumps(records[:3]))
    assert len(known_facts.load_known(str(own))) == 3                         # any file of the format
    monkeypatch.setattr(known_facts, "default_path", lambda: str(own))
    with pytest.raises(UserError, match="does not match"):
        known_facts.load_known()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "x"}]))
    with pytest.raises(UserError, match="format"):
        known_facts.load_known(str(bad))


def test_filter_known():
    ps = tasks.get_task("facts")(build_tokenizer("bpe"), n=10)
    top1 = ps.answer_ids[:, 0].clone()
    top1[::2] = -5
    kept = known_facts.filter_known(ps, top1)
    assert len(kept) == 5 and kept.n_filtered == 5
    assert kept.meta["known_id"] == ps.meta["known_id"][1::2]
    with pytest.raises(UserError, match="none of the 10"):
        known_facts.filter_known(ps, torch.full((10,), -5))


def test_registry_and_corpus():
    assert set(BUILT_IN) <= set(tasks.TASKS) and "permutations" in tasks.TASKS
    with pytest.raises(UserError, match="unknown task"):
        tasks.get_task("nope")
    text = "\n".join(tasks.corpus())
    assert all(w in text for w in tasks.vocab_words())
    assert "123 132 213 231 312 321" in text and len(tasks.permutation_strings(5)) == 120
