"""tasks/permutations.py against brute-force references (itertools), plus data/export/tokenizer checks."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from interpkit.tasks.permutations import (
    Stories,
    build_tokenizer,
    compose,
    encode_actions,
    export_dataset,
    inversion_parity,
    load_split,
    make_labels,
    perm_token_ids,
    run_states,
    sample_stories,
    save_split,
    special_prefix,
    stories_to_text,
    story_prompt_set,
    symmetric_group,
    text_to_actions,
    topic_model_stories,
)


def ref_compose(state, action):
    """The seed repository's rule, written independently: new_state[j] = state[action[j] - 1]."""
    out = [None] * len(action)
    for j, a in enumerate(action):
        out[j] = state[a - 1]
    return tuple(out)


def ref_parity(p):
    return sum(1 for i, j in itertools.combinations(range(len(p)), 2) if p[i] > p[j]) % 2


@pytest.mark.parametrize("n", [3, 4, 5])
def test_group_matches_itertools(n):
    g = symmetric_group(n)
    ref = list(itertools.permutations(range(1, n + 1)))
    assert list(g.perms) == ref                       # lexicographic, identity first
    assert g.perms[0] == tuple(range(1, n + 1))
    assert g.strings[0] == "".join(map(str, range(1, n + 1)))
    idx = {p: i for i, p in enumerate(ref)}
    table = torch.tensor([[idx[ref_compose(s, a)] for a in ref] for s in ref])
    assert torch.equal(g.table, table)
    assert g.parity.tolist() == [ref_parity(p) for p in ref]
    assert all(compose(s, a) == ref_compose(s, a) for s in ref[:7] for a in ref[:7])
    assert all(inversion_parity(p) == ref_parity(p) for p in ref)


def test_s3_known_values():
    g = symmetric_group(3)
    assert g.strings == ("123", "132", "213", "231", "312", "321")
    # 123 --132--> 132 --321--> 231 (seed convention)
    st = run_states(torch.tensor([[g.index("132"), g.index("321")]]), 3)
    assert [g.strings[i] for i in st[0].tolist()] == ["132", "231"]
    assert g.parity.tolist() == [0, 1, 1, 0, 0, 1]


@pytest.mark.parametrize("n", [3, 5])
def test_stories_states_and_labels_brute_force(n):
    g = symmetric_group(n)
    st = sample_stories(20, 12, n, seed=3)
    for row_a, row_s in zip(st.actions.tolist(), st.states.tolist()):
        state = tuple(range(1, n + 1))
        for a, s in zip(row_a, row_s):
            state = ref_compose(state, g.perms[a])
            assert g.perms[s] == state
    assert torch.equal(st.labels("direct_state"), st.states)
    assert st.labels("parity").tolist() == [[ref_parity(g.perms[s]) for s in r] for r in st.states.tolist()]
    nt = make_labels(st.actions, n, "next_token")
    assert torch.equal(nt[:, :-1], st.actions[:, 1:]) and (nt[:, -1] == -100).all()
    with pytest.raises(ValueError):
        make_labels(st.actions, n, "bogus")


def test_generator_determinism():
    a, b, c = sample_stories(50, 30, seed=1), sample_stories(50, 30, seed=1), sample_stories(50, 30, seed=2)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.states, b.states)
    assert not torch.equal(a.actions, c.actions)
    gen = torch.Generator().manual_seed(1)
    first, second = sample_stories(50, 30, generator=gen), sample_stories(50, 30, generator=gen)
    assert torch.equal(first.actions, a.actions) and not torch.equal(first.actions, second.actions)
    assert sample_stories(7, 100, 5, seed=0).actions.shape == (7, 100)
    assert int(sample_stories(2000, 4, 5, seed=0).actions.max()) == 119


def test_text_round_trip():
    st = sample_stories(5, 9, seed=0)
    texts = stories_to_text(st.actions, 3)
    assert all(len(t.split()) == 9 and all(len(w) == 3 for w in t.split()) for t in texts)
    assert torch.equal(text_to_actions(texts, 3), st.actions)


def test_topic_model_shapes_and_determinism():
    a = topic_model_stories(40, 100, seed=5)
    b = topic_model_stories(40, 100, seed=5)
    c = topic_model_stories(40, 100, seed=6)
    assert a.words.shape == a.topics.shape == (40, 100)
    assert a.topic_word.shape == (4, 6) and a.doc_topic.shape == (40, 4)
    assert int(a.words.max()) < 6 and int(a.topics.max()) < 4
    assert torch.allclose(a.topic_word.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.equal(a.words, b.words) and torch.equal(a.topics, b.topics)
    assert not torch.equal(a.words, c.words)
    # words follow the topic-word distribution of their topic: a fixed, peaked mapping is respected
    tw = torch.zeros(4, 6)
    for k in range(4):
        tw[k, k] = 1.0
    fixed = topic_model_stories(10, 50, seed=0, topic_word=tw)
    assert torch.equal(fixed.words, fixed.topics)
    assert len(a.texts()) == 40 and len(a.texts()[0].split()) == 100


def test_export_round_trip(tmp_path):
    paths = export_dataset(str(tmp_path), 300, 20, 3, seed=0, train_ratio=0.8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.npz", "train.npz"]
    tr, te = load_split(paths["train"]), load_split(paths["test"])
    assert len(tr) + len(te) <= 300 and len(te) > 0 and len(tr) > len(te)
    assert torch.equal(tr.states, run_states(tr.actions, 3))
    both = np.concatenate([tr.actions.numpy(), te.actions.numpy()])
    assert len(np.unique(both, axis=0)) == len(both)        # unique stories
    st = sample_stories(10, 7, 5, seed=1)
    save_split(str(tmp_path / "s5.npz"), st)
    back = load_split(str(tmp_path / "s5.npz"))
    assert back.n == 5 and torch.equal(back.actions, st.actions) and torch.equal(back.states, st.states)


def test_word_level_tokenizer(tmp_path):
    tok = build_tokenizer(3)
    g = symmetric_group(3)
    assert len(tok) == 4 + 2 + 6
    ids = tok("213 132 321", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["213", "132", "321"]
    assert torch.equal(perm_token_ids(tok, 3, space=True), perm_token_ids(tok, 3, space=False))
    st = sample_stories(4, 6, seed=0)
    enc = torch.tensor(tok(st.texts(), add_special_tokens=False)["input_ids"])
    assert torch.equal(enc, encode_actions(st.actions, tok, 3))
    tok.save_pretrained(tmp_path / "a")
    build_tokenizer(3).save_pretrained(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_text() == (tmp_path / "b/tokenizer.json").read_text()
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert again.convert_ids_to_tokens(perm_token_ids(again, 3).tolist()) == list(g.strings)
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.bos_token == "<bos>"


def test_bos_tokenizer_and_prompt_set():
    tok = build_tokenizer(3, add_bos=True)
    st = sample_stories(4, 6, seed=0)
    enc = torch.tensor(tok(st.texts())["input_ids"])
    assert (enc[:, 0] == tok.bos_token_id).all() and enc.shape == (4, 7)
    assert torch.equal(enc, encode_actions(st.actions, tok, 3))
    assert torch.equal(encode_actions(st.actions, tok, 3, add_special_tokens=False), enc[:, 1:])
    assert special_prefix(tok) == [tok.bos_token_id] and special_prefix(build_tokenizer(3)) == []
    ps = story_prompt_set(tok, 5, 6, seed=0)
    assert ps.input_ids.shape == (5, 7) and (ps.roles["last"] == 6).all() and (ps.roles["first"] == 1).all()






def test_story_prompt_set():
    tok = build_tokenizer(3)
    ps = story_prompt_set(tok, 12, 10, seed=4)
    st = sample_stories(12, 10, seed=4)
    ids = perm_token_ids(tok, 3)
    assert ps.input_ids.shape == (12, 10) and ps.attention_mask.all()
    assert torch.equal(ps.answer_ids[:, 0], ids[st.states[:, -1]])
    assert ps.wrong_ids.shape == (12, 5)
    assert not (ps.wrong_ids == ps.answer_ids).any()
    assert (ps.roles["last"] == 9).all()
    assert ps.meta["parity"] == st.parities[:, -1].tolist()
    sub = ps.subset([0, 3])
    assert len(sub) == 2 and sub.input_ids.shape == (2, 10)


def test_stories_dataclass():
    st = sample_stories(3, 4, seed=0)
    assert isinstance(st, Stories) and len(st) == 3 and st.group.size == 6
    assert torch.equal(st.parities, symmetric_group(3).parity[st.states])
