"""Synthetic context-free grammars of the "Physics of Language Models" part 1 kind (cfg3-style).

A *layered* grammar: level 0 is the root, level k has ``levels[k]`` non-terminals (NTs), and every rule
of a level-k NT rewrites it into 2-3 symbols of level k+1 (the last NT level rewrites into terminals
{1, 2, 3}). Every NT has 2-3 distinct rules. A string therefore has exactly one derivation depth, and
its *DP state* at terminal position i is, for each level k, the NT ancestor of i at level k and whether
i ends that ancestor's subtree (the "NT boundary").

``random_grammar`` draws such a grammar from a seed; ``sample`` draws strings with their generation
trees' labels; ``parse`` is a bottom-up dynamic program (CYK over the layered grammar, all spans at all
levels, derivations counted) that decides membership and labels every position from one parse;
``brute_force_parses`` enumerates every derivation top-down (exponential; tests only).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from interpkit import validate as V
from interpkit.errors import UserError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


@dataclass
class CFGConfig:
    """Shape of a random grammar. Defaults: root + 3 NT levels of 3 NTs, 4 expansions (16-81 tokens)."""

    levels: tuple[int, ...] = (1, 3, 3, 3)
    terminals: int = 3
    rules: tuple[int, int] = (2, 3)       # (fewest, most) rules of a non-terminal
    rule_len: tuple[int, int] = (2, 3)    # (fewest, most) symbols on a rule's right-hand side
    seed: int = 0

    def __post_init__(self) -> None:
        self.levels = tuple(int(x) for x in self.levels)         # lists after a JSON round trip
        self.rules, self.rule_len = tuple(self.rules), tuple(self.rule_len)
        if len(self.levels) < 1 or self.levels[0] != 1 or min(self.levels) < 1:
            raise UserError(f"levels {self.levels}: the first level is the single root, all sizes >= 1")
        V.in_range("rules[0]", self.rules[0], 1, self.rules[1])
        V.in_range("rule_len[0]", self.rule_len[0], 1, self.rule_len[1])
        V.at_least("terminals", self.terminals, 2)


@dataclass
class Grammar:
    """rules[k][a] = list of right-hand sides of NT a at level k (indices into level k+1, or terminals
    0..terminals-1 for the last level)."""

    levels: tuple[int, ...]
    terminals: int
    rules: list[list[list[tuple[int, ...]]]]

    @property
    def depth(self) -> int:
        return len(self.levels)

    def size(self, k: int) -> int:
        """Number of symbols at level k (k = depth: terminals)."""
        return self.terminals if k == self.depth else self.levels[k]

    def describe(self) -> str:
        """The rules, one NT per line ("N1.0 -> N2.1 N2.0 | ..."; terminals printed as 1..T)."""
        lines = []
        for k, level in enumerate(self.rules):
            last = k + 1 == self.depth
            for a, rhs in enumerate(level):
                alts = " | ".join(" ".join(str(s + 1) if last else f"N{k + 1}.{s}" for s in r) for r in rhs)
                lines.append(f"N{k}.{a} -> {alts}")
        return "\n".join(lines)


def random_grammar(cfg: CFGConfig | None = None) -> Grammar:
    """A random layered grammar; every symbol of level k+1 is used by some rule of level k."""
    cfg = cfg or CFGConfig()
    rng = random.Random(cfg.seed)
    rules = []
    for k in range(len(cfg.levels)):
        n_child = cfg.terminals if k + 1 == len(cfg.levels) else cfg.levels[k + 1]
        for _ in range(1000):
            level = []
            for _a in range(cfg.levels[k]):
                n_rules = rng.randint(*cfg.rules)
                rhs: list[tuple[int, ...]] = []
                while len(rhs) < n_rules:
                    r = tuple(rng.randrange(n_child) for _ in range(rng.randint(*cfg.rule_len)))
                    if r not in rhs:
                        rhs.append(r)
                level.append(rhs)
            if {s for rhs in level for r in rhs for s in r} == set(range(n_child)):
                break
        else:
            raise UserError(f"could not draw level {k} using all {n_child} child symbols; add rules")
        rules.append(level)
    return Grammar(levels=cfg.levels, terminals=cfg.terminals, rules=rules)


@dataclass
class CFGSample:
    """One string (terminals 0..T-1) with its generation tree's DP labels [depth, n]."""

    tokens: list[int]
    ancestors: list[list[int]]     # ancestors[k][i]: NT at level k above position i
    boundary: list[list[int]]      # boundary[k][i]: 1 if i is the last position of that subtree


def _labels(parent_chain: list[list[int]], symbols: list[list[int]], n: int) -> tuple[list, list]:
    """From per-level node lists (symbol of each node; index of each terminal's ancestor node)."""
    anc, bnd = [], []
    for k in range(len(symbols)):
        node = parent_chain[k]
        anc.append([symbols[k][node[i]] for i in range(n)])
        bnd.append([int(i == n - 1 or node[i + 1] != node[i]) for i in range(n)])
    return anc, bnd


def sample_one(g: Grammar, rng: random.Random) -> CFGSample:
    """Expand the root level by level, remembering every terminal's ancestor node at each level."""
    symbols = [[0]]                       # symbols[k] = NT of each node at level k
    owner: list[list[int]] = []           # owner[k][j] = node index at level k of node j at level k+1
    for k in range(g.depth):
        nxt, own = [], []
        for node, a in enumerate(symbols[k]):
            r = rng.choice(g.rules[k][a])
            nxt += list(r)
            own += [node] * len(r)
        owner.append(own)
        if k + 1 < g.depth:
            symbols.append(nxt)
        else:
            tokens = nxt
    n = len(tokens)
    chain: list[list[int]] = [[] for _ in range(g.depth)]     # chain[k][i]: level-k node above terminal i
    cur = owner[-1]
    chain[-1] = cur
    for k in range(g.depth - 2, -1, -1):
        cur = [owner[k][c] for c in cur]
        chain[k] = cur
    anc, bnd = _labels(chain, symbols, n)
    return CFGSample(tokens=tokens, ancestors=anc, boundary=bnd)


def sample(g: Grammar, n: int, seed: int = 0) -> list[CFGSample]:
    rng = random.Random(seed)
    return [sample_one(g, rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
@dataclass
class ParseResult:
    accepted: bool
    n_parses: int = 0
    ancestors: list[list[int]] = field(default_factory=list)
    boundary: list[list[int]] = field(default_factory=list)


def parse(g: Grammar, tokens: list[int]) -> ParseResult:
    """Bottom-up DP over the layered grammar: every (level, start, end, NT) span, derivations counted.

    Level by level from the terminals up: a span (i, j) is NT a at level k when a rule of a splits it into
    consecutive spans of the rule's symbols at level k+1. Returns one parse's labels (the first found).
    """
    n = len(tokens)
    D = g.depth
    ends: list[dict] = [dict() for _ in range(D + 1)]       # ends[k][(i, sym)] = [j, ...]
    count: list[dict] = [dict() for _ in range(D + 1)]      # count[k][(i, j, sym)]
    back: list[dict] = [dict() for _ in range(D + 1)]       # back[k][(i, j, sym)] = child spans
    for i, t in enumerate(tokens):
        if not 0 <= t < g.terminals:
            return ParseResult(False)
        ends[D][(i, t)] = [i + 1]
        count[D][(i, i + 1, t)] = 1
    for k in range(D - 1, -1, -1):
        starts = [0] if k == 0 else range(n)
        for i in starts:
            for a, rhs_list in enumerate(g.rules[k]):
                for rhs in rhs_list:
                    partial = [(i, 1, ())]
                    for s in rhs:
                        partial = [(e, c * count[k + 1][(p, e, s)], bp + ((p, e, s),))
                                   for p, c, bp in partial for e in ends[k + 1].get((p, s), ())]
                        if not partial:
                            break
                    for e, c, bp in partial:
                        key = (i, e, a)
                        if key not in count[k]:
                            count[k][key] = 0
                            back[k][key] = bp
                            ends[k].setdefault((i, a), []).append(e)
                        count[k][key] += c
    total = count[0].get((0, n, 0), 0)
    if total == 0:
        return ParseResult(False)
    anc = [[-1] * n for _ in range(D)]
    bnd = [[0] * n for _ in range(D)]
    stack = [(0, 0, n, 0)]
    while stack:
        k, i, j, a = stack.pop()
        for p in range(i, j):
            anc[k][p] = a
        bnd[k][j - 1] = 1
        if k + 1 < D:
            stack += [(k + 1, p, e, s) for p, e, s in back[k][(i, j, a)]]
    return ParseResult(True, total, anc, bnd)


def brute_force_parses(g: Grammar, tokens: list[int]) -> list[tuple[tuple, tuple]]:
    """Every derivation of ``tokens`` as (ancestors, boundary) tuples, by plain top-down search."""
    n = len(tokens)

    def expand(k: int, a: int, i: int):
        """Yield (end, [(level, start, end, sym), ...]) for NT a at level k starting at i."""
        for rhs in g.rules[k][a]:
            yield from seq(k, rhs, i, [(k, i, a)])

    def seq(k: int, rhs: tuple, i: int, acc: list):
        if not rhs:
            yield i, acc
            return
        s, rest = rhs[0], rhs[1:]
        if k + 1 == g.depth:
            if i < n and tokens[i] == s:
                yield from seq(k, rest, i + 1, acc)
            return
        for e, sub in expand(k + 1, s, i):
            yield from seq(k, rest, e, acc + sub)

    out = []
    for e, nodes in expand(0, 0, 0):
        if e != n:
            continue
        # nodes carry starts only; ends come from the next node of the same level starting later
        anc = [[-1] * n for _ in range(g.depth)]
        bnd = [[0] * n for _ in range(g.depth)]
        by_level: dict[int, list] = {}
        for k, i, a in nodes:
            by_level.setdefault(k, []).append((i, a))
        for k, lst in by_level.items():
            lst.sort()
            for m, (i, a) in enumerate(lst):
                j = lst[m + 1][0] if m + 1 < len(lst) else n
                for p in range(i, j):
                    anc[k][p] = a
                bnd[k][j - 1] = 1
        out.append((tuple(map(tuple, anc)), tuple(map(tuple, bnd))))
    return out


# ------------------------------------------------------------------------------------------------
# tokens
# ------------------------------------------------------------------------------------------------
def build_tokenizer(terminals: int = 3):
    """Word-level tokenizer: <pad> <bos> <eos>, then the terminals "1".."T" (ids 3..)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [PAD, BOS, EOS] + [str(t + 1) for t in range(terminals)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=PAD))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   model_max_length=4096, clean_up_tokenization_spaces=False)


TERMINAL_OFFSET = 3


def encode(samples: list[CFGSample], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded <bos> s <eos> rows: input_ids, attention_mask, labels (-100 at padding)."""
    T = pad_to or max(len(s.tokens) for s in samples) + 2
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(samples):
        row = [1] + [t + TERMINAL_OFFSET for t in s.tokens] + [2]
        row = row[:T]
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def dp_labels(samples: list[CFGSample], T: int, depth: int) -> dict[str, torch.Tensor]:
    """Per-position probe labels [N, T] for the right-padded encoding (-1 off the string): ``anc{k}``,
    ``bnd{k}`` at every position and ``ancend{k}`` (the ancestor at positions ending a level-k subtree)."""
    out = {}
    for k in range(1, depth):
        for name in ("anc", "bnd", "ancend"):
            out[f"{name}{k}"] = torch.full((len(samples), T), -1, dtype=torch.long)
        for r, s in enumerate(samples):
            n = min(len(s.tokens), T - 1)
            a = torch.tensor(s.ancestors[k][:n])
            b = torch.tensor(s.boundary[k][:n])
            out[f"anc{k}"][r, 1:n + 1] = a           # position i+1 holds terminal i (after <bos>)
            out[f"bnd{k}"][r, 1:n + 1] = b
            out[f"ancend{k}"][r, 1:n + 1] = torch.where(b == 1, a, torch.full_like(a, -1))
    return out
