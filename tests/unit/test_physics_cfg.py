"""Issue 18, part 1: the CFG generator, the DP parser and its labels."""
from __future__ import annotations

import random

import pytest
import torch

from interpkit.tasks.cfg import CFGConfig, brute_force_parses, dp_labels, encode, parse, random_grammar, sample


@pytest.fixture(scope="module")
def grammar():
    return random_grammar(CFGConfig(seed=0))


def test_grammar_shape(grammar):
    for k, level in enumerate(grammar.rules):
        assert len(level) == grammar.levels[k]
        for rhs in level:
            assert 2 <= len(rhs) <= 3 and len(set(rhs)) == len(rhs)
            assert all(2 <= len(r) <= 3 for r in rhs)
        assert {s for rhs in level for r in rhs for s in r} == set(range(grammar.size(k + 1)))


def test_parser_accepts_generated_and_labels_match_generation(grammar):
    unique = 0
    for s in sample(grammar, 150, seed=1):
        r = parse(grammar, s.tokens)
        assert r.accepted and r.n_parses >= 1
        if r.n_parses == 1:
            unique += 1
            assert r.ancestors == s.ancestors and r.boundary == s.boundary
    assert unique > 20


def mutate(tokens: list[int], rng: random.Random, terminals: int = 3) -> list[int]:
    """One random edit: replace, delete or insert a terminal (never the identity edit)."""
    t = list(tokens)
    kind = rng.choice(("replace", "delete", "insert"))
    i = rng.randrange(len(t))
    if kind == "replace":
        t[i] = rng.choice([x for x in range(terminals) if x != t[i]])
    elif kind == "delete":
        del t[i]
    else:
        t.insert(i, rng.randrange(terminals))
    return t


def test_parser_rejects_mutations_and_agrees_with_brute_force(grammar):
    rng = random.Random(0)
    rejected = n = 0
    for s in sample(grammar, 80, seed=2):
        m = mutate(s.tokens, rng)
        r = parse(grammar, m)
        bf = brute_force_parses(grammar, m)
        assert r.accepted == bool(bf) and r.n_parses == len(bf)
        rejected += not r.accepted
        n += 1
    assert rejected / n > 0.8                          # single edits almost always leave the language


def test_dp_labels_equal_a_brute_force_parse(grammar):
    shortest = sorted(sample(grammar, 300, seed=3), key=lambda s: len(s.tokens))[:15]
    ambiguous = 0
    for s in shortest:
        r = parse(grammar, s.tokens)
        bf = brute_force_parses(grammar, s.tokens)
        assert r.n_parses == len(bf)
        assert (tuple(map(tuple, r.ancestors)), tuple(map(tuple, r.boundary))) in bf
        assert (tuple(map(tuple, s.ancestors)), tuple(map(tuple, s.boundary))) in bf
        ambiguous += len(bf) > 1
    # a denser grammar: many ambiguous strings, counts still agree
    g2 = random_grammar(CFGConfig(levels=(1, 2, 2), terminals=2, seed=5))
    for s in sample(g2, 30, seed=4):
        r = parse(g2, s.tokens)
        assert r.n_parses == len(brute_force_parses(g2, s.tokens))


def test_probe_labels_are_aligned_after_bos(grammar):
    s = sample(grammar, 3, seed=7)
    enc = encode(s)
    lab = dp_labels(s, enc["input_ids"].shape[1], grammar.depth)
    for r, smp in enumerate(s):
        n = len(smp.tokens)
        assert lab["anc3"][r, 0] == -1 and lab["anc3"][r, n + 1] == -1        # <bos>, <eos>
        assert lab["anc3"][r, 1:n + 1].tolist() == smp.ancestors[3]
        assert int(lab["bnd1"][r, n]) == 1                                  # the string ends every subtree
        ends = torch.tensor(smp.boundary[2]).bool()
        assert (lab["ancend2"][r, 1:n + 1][~ends] == -1).all()
    assert (enc["input_ids"][0, 1:len(s[0].tokens) + 1] - 3).tolist() == s[0].tokens
