"""Permutation state tracking (S_n word problems), after Li, Guo & Andreas 2025, "(How) Do Language
Models Track State?".

A *story* is a sequence of actions a_0 .. a_{T-1}, each a permutation of (1..n) written as a digit
string ("213"). The state starts at the identity and each action rearranges it:

    new_state[j] = state[action[j] - 1]        (1-based, the seed repository's convention)

so s_t = s_{t-1} . a_t is the left-to-right product of the actions. A model reads the actions (one token
each) and must emit s_t at every position t (``direct_state`` supervision). With a *scratchpad*
(``scratchpad`` supervision) the story interleaves the states with the actions, s_0 a_1 s_1 a_2 ... a_T,
and the model writes each state after reading the action, feeding its own states back when generating.

Everything works on *indices* into ``group.perms`` (identity = index 0); tokens come in only at the
edges (``perm_token_ids``). Composition is one lookup in a precomputed [P, P] table, so generating
stories of any number and length is a few vectorised torch ops, seeded by a ``torch.Generator``.

Module imports are restricted to torch/numpy/math/typing/dataclasses/functools/collections at the top
level (tokenizer and file helpers import what they need locally), so the core can run inside nnsight
traces, including remote ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from interpkit.tasks.base import PromptSet

SUPERVISIONS = ("direct_state", "parity", "next_token", "scratchpad")
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
PARITY_TOKENS = ("0", "1")                 # labels of the parity curriculum ("0" even, "1" odd)


# --------------------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------------------
def _lex_permutations(items: tuple[int, ...]) -> list[tuple[int, ...]]:
    """All permutations of ``items`` in lexicographic order (identity first for sorted input)."""
    if len(items) <= 1:
        return [items]
    out = []
    for i, head in enumerate(items):
        out += [(head,) + rest for rest in _lex_permutations(items[:i] + items[i + 1:])]
    return out


def compose(state: tuple[int, ...], action: tuple[int, ...]) -> tuple[int, ...]:
    """One step of the story: ``new[j] = state[action[j] - 1]`` (permutations as 1-based tuples)."""
    return tuple(state[a - 1] for a in action)


def inversion_parity(perm: tuple[int, ...]) -> int:
    """Number of inversions mod 2: 0 for even permutations, 1 for odd ones."""
    n = len(perm)
    return sum(perm[i] > perm[j] for i in range(n) for j in range(i + 1, n)) % 2


@dataclass(frozen=True, eq=False)
class PermGroup:
    """S_n as tables over permutation indices (index 0 = identity).

    table[s, a] = index of compose(perms[s], perms[a]); parity[i] = inversion parity of perms[i].
    """

    n: int
    perms: tuple[tuple[int, ...], ...]
    strings: tuple[str, ...]
    table: torch.Tensor          # [P, P] long
    parity: torch.Tensor         # [P] long (0 even, 1 odd)

    @property
    def size(self) -> int:
        return len(self.perms)

    def index(self, perm: tuple[int, ...] | str) -> int:
        """Index of a permutation given as a tuple or a digit string."""
        s = perm if isinstance(perm, str) else "".join(map(str, perm))
        return self.strings.index(s)


@lru_cache(maxsize=None)
def symmetric_group(n: int) -> PermGroup:
    """S_n with permutations in lexicographic order (identity first) and its composition table."""
    if not 2 <= n <= 9:
        raise ValueError(f"S_n needs 2 <= n <= 9 (one digit per item), got n={n}")
    perms = tuple(_lex_permutations(tuple(range(1, n + 1))))
    P = torch.tensor(perms, dtype=torch.long) - 1                 # [P, n], 0-based
    # composed[s, a, j] = P[s, P[a, j]]: the state s rearranged by action a
    composed = P[:, P]                                            # [P, P, n]
    code = lambda x: (x * n ** torch.arange(n - 1, -1, -1)).sum(-1)  # noqa: E731  base-n key
    lookup = torch.full((n ** n,), -1, dtype=torch.long)
    lookup[code(P)] = torch.arange(len(perms))
    table = lookup[code(composed)]
    inv = (P[:, :, None] > P[:, None, :]).triu(diagonal=1).sum((1, 2))
    return PermGroup(n=n, perms=perms, strings=tuple("".join(map(str, p)) for p in perms),
                     table=table, parity=inv % 2)


# --------------------------------------------------------------------------------------------------
# Stories
# --------------------------------------------------------------------------------------------------
@dataclass
class Stories:
    """A batch of stories as permutation indices: actions[i, t] and states[i, t] (state after a_t)."""

    n: int
    actions: torch.Tensor        # [N, T] long
    states: torch.Tensor         # [N, T] long

    @property
    def group(self) -> PermGroup:
        return symmetric_group(self.n)

    @property
    def parities(self) -> torch.Tensor:
        return self.group.parity[self.states]

    def __len__(self) -> int:
        return self.actions.shape[0]

    def texts(self) -> list[str]:
        """The stories as strings, e.g. "213 132 321"."""
        return stories_to_text(self.actions, self.n)

    def labels(self, supervision: str = "direct_state") -> torch.Tensor:
        """Per-position targets as permutation indices (parity: 0/1; next_token: -100 at the end)."""
        return make_labels(self.actions, self.n, supervision)


def run_states(actions: torch.Tensor, n: int, start: torch.Tensor | int = 0) -> torch.Tensor:
    """States after every action: [..., T] action indices -> [..., T] state indices."""
    table = symmetric_group(n).table
    state = torch.as_tensor(start, dtype=torch.long).expand(actions.shape[:-1]).clone()
    out = torch.empty_like(actions)
    for t in range(actions.shape[-1]):
        state = table[state, actions[..., t]]
        out[..., t] = state
    return out


def sample_stories(n_stories: int, length: int, n: int = 3, *, seed: int | None = None,
                   generator: torch.Generator | None = None) -> Stories:
    """``n_stories`` stories of ``length`` uniformly random actions (with replacement).

    Pass ``seed`` (a fresh generator is made) or a ``generator`` to continue a stream.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    g = symmetric_group(n)
    actions = torch.randint(g.size, (n_stories, length), generator=generator)
    return Stories(n=n, actions=actions, states=run_states(actions, n))


def scratchpad_sequence(actions: torch.Tensor, n: int) -> torch.Tensor:
    """[..., T] actions -> [..., 2T] the scratchpad story s_0 a_1 s_1 ... s_{T-1} a_T as permutation
    indices (s_0 = identity): the action a_t sits at column 2t - 1, the state the model must write
    after it is the next column's token."""
    seq = torch.zeros(*actions.shape[:-1], 2 * actions.shape[-1], dtype=torch.long)
    seq[..., 1::2] = actions
    seq[..., 2::2] = run_states(actions, n)[..., :-1]
    return seq


def make_labels(actions: torch.Tensor, n: int, supervision: str = "direct_state") -> torch.Tensor:
    """Targets per position: ``direct_state`` = state after each action, ``parity`` = its parity,
    ``next_token`` = the next action (-100 at the last position), ``scratchpad`` = per column of
    ``scratchpad_sequence``, the state after the action there (-100 at the state columns)."""
    if supervision == "scratchpad":
        out = torch.full((*actions.shape[:-1], 2 * actions.shape[-1]), -100, dtype=torch.long)
        out[..., 1::2] = run_states(actions, n)
        return out
    if supervision == "direct_state":
        return run_states(actions, n)
    if supervision == "parity":
        return symmetric_group(n).parity[run_states(actions, n)]
    if supervision == "next_token":
        out = torch.full_like(actions, -100)
        out[..., :-1] = actions[..., 1:]
        return out
    raise ValueError(f"unknown supervision {supervision!r}; use one of {SUPERVISIONS}")


def stories_to_text(actions: torch.Tensor, n: int) -> list[str]:
    """Index rows -> "213 132 ..." strings."""
    s = symmetric_group(n).strings
    return [" ".join(s[i] for i in row) for row in actions.tolist()]


def text_to_actions(texts: list[str], n: int) -> torch.Tensor:
    """"213 132 ..." strings (all the same length) -> [N, T] indices."""
    idx = {s: i for i, s in enumerate(symmetric_group(n).strings)}
    return torch.tensor([[idx[w] for w in t.split()] for t in texts], dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Topic-model pretraining data (LDA over the action strings; no state structure)
# --------------------------------------------------------------------------------------------------
@dataclass
class TopicStories:
    """LDA documents over the n! action strings: words[i, t] (perm indices), topics[i, t],
    topic_word [K, P] (shared), doc_topic [N, K]."""

    n: int
    words: torch.Tensor
    topics: torch.Tensor
    topic_word: torch.Tensor
    doc_topic: torch.Tensor

    def texts(self) -> list[str]:
        return stories_to_text(self.words, self.n)


def topic_model_stories(n_stories: int, length: int = 100, n: int = 3, *, n_topics: int = 4,
                        alpha: float = 0.3, beta: float = 0.3, seed: int = 0,
                        topic_word: torch.Tensor | None = None) -> TopicStories:
    """LDA generator: topic-word ~ Dir(beta) (or given [K, P]), per document theta ~ Dir(alpha),
    each word: topic ~ theta, word ~ topic_word[topic]. Seeded (numpy PCG64) and vectorised."""
    rng = np.random.default_rng(seed)
    P = symmetric_group(n).size
    if topic_word is None:
        tw = rng.dirichlet(np.full(P, beta), size=n_topics)
    else:
        tw = np.asarray(topic_word, dtype=np.float64)
        if tw.shape != (n_topics, P):
            raise ValueError(f"topic_word must be [{n_topics}, {P}], got {tuple(tw.shape)}")
        tw = tw / tw.sum(1, keepdims=True)
    theta = rng.dirichlet(np.full(n_topics, alpha), size=n_stories)               # [N, K]
    topics = _categorical(rng, theta[:, None, :].repeat(length, 1))                # [N, T]
    words = _categorical(rng, tw[topics])                                          # [N, T]
    return TopicStories(n=n, words=torch.from_numpy(words), topics=torch.from_numpy(topics),
                        topic_word=torch.from_numpy(tw), doc_topic=torch.from_numpy(theta))


def load_topic_mapping(path: str, n: int = 3, n_topics: int | None = None) -> np.ndarray:
    """A [K, n!] topic-word matrix from JSON: a list of K rows over the permutations in lexicographic
    order (the seed's ``paper_topic_mapping.json``) or an object with ``topic_mapping_0`` (one of its
    story files). Rows are renormalised; bad files raise UserError."""
    import json

    from interpkit.errors import UserError

    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as e:
        raise UserError(f"cannot read topic mapping {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"topic mapping {path} is not JSON: {e.msg} (line {e.lineno})") from None
    if isinstance(data, dict):
        data = data.get("topic_mapping_0")
    P = symmetric_group(n).size
    try:
        tw = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        tw = np.zeros(0)
    if tw.ndim != 2 or tw.shape[1] != P or (n_topics is not None and tw.shape[0] != n_topics):
        want = f"[{n_topics if n_topics is not None else 'K'}, {P}]"
        raise UserError(f"topic mapping {path} must be a {want} list of probabilities over the S{n} "
                        f"permutations, got shape {tuple(tw.shape) if tw.ndim else 'none'}")
    if (tw < 0).any() or (tw.sum(1) <= 0).any():
        raise UserError(f"topic mapping {path} has negative or all-zero rows")
    return tw / tw.sum(1, keepdims=True)


def export_topic_dataset(out_dir: str, n_stories: int, length: int = 100, n: int = 3, *, n_topics: int = 4,
                         alpha: float = 0.3, beta: float = 0.3, seed: int = 0, train_ratio: float = 0.999,
                         topic_mapping: str | None = None) -> dict[str, str]:
    """Topic-model pretraining data (``topic_model_stories``), one ``.npz`` per split: words (action
    indices), per-word topics, per-story topic distributions, the shared topic-word matrix and the
    permutation table. ``topic_mapping`` starts from a given [K, n!] matrix instead of Dir(beta)."""
    import os

    tw = None if topic_mapping is None else load_topic_mapping(topic_mapping, n)
    n_topics = n_topics if tw is None else len(tw)          # a given mapping sets the number of topics
    ts = topic_model_stories(n_stories, length, n, n_topics=n_topics, alpha=alpha, beta=beta, seed=seed,
                             topic_word=tw)
    is_test = np.random.default_rng(seed + 1).random(n_stories) >= train_ratio
    os.makedirs(out_dir, exist_ok=True)
    paths, g = {}, symmetric_group(n)
    dt = np.uint8 if g.size <= 256 else np.int16
    for split, mask in (("train", ~is_test), ("test", is_test)):
        paths[split] = os.path.join(out_dir, f"{split}.npz")
        m = torch.from_numpy(mask)
        np.savez_compressed(paths[split], n=np.int64(n), perms=np.array(g.perms, dtype=np.int8),
                            words=ts.words[m].numpy().astype(dt), topics=ts.topics[m].numpy().astype(np.uint8),
                            doc_topic=ts.doc_topic[m].numpy().astype(np.float32),
                            topic_word=ts.topic_word.numpy(), alpha=np.float64(alpha), beta=np.float64(beta))
    return paths


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of probs[..., K] by inverse CDF."""
    cdf = probs.cumsum(-1)
    u = rng.random(probs.shape[:-1] + (1,)) * cdf[..., -1:]
    return np.minimum((u > cdf).sum(-1), probs.shape[-1] - 1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Export: one compressed .npz file per split
# --------------------------------------------------------------------------------------------------
def export_dataset(out_dir: str, n_stories: int, length: int, n: int = 3, *, seed: int = 0,
                   train_ratio: float = 0.9, unique: bool = True) -> dict[str, str]:
    """Write ``train.npz`` and ``test.npz`` (actions and states as small ints plus the permutation
    table) to ``out_dir``; returns {split: path}. ``unique`` drops duplicate stories."""
    import os

    gen = torch.Generator().manual_seed(seed)
    st = sample_stories(n_stories, length, n, generator=gen)
    actions = st.actions
    if unique:
        _, first = np.unique(actions.numpy(), axis=0, return_index=True)
        actions = actions[torch.from_numpy(np.sort(first))]
    is_test = torch.rand(len(actions), generator=gen) >= train_ratio
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, mask in (("train", ~is_test), ("test", is_test)):
        paths[split] = os.path.join(out_dir, f"{split}.npz")
        save_split(paths[split], Stories(n=n, actions=actions[mask], states=run_states(actions[mask], n)))
    return paths


def data_command(out: str, *, kind: str = "permutations", n: int = 3, length: int = 100, stories: int = 100_000,
                 seed: int = 0, train_ratio: float = 0.9, topics: int = 4, alpha: float = 0.3, beta: float = 0.3,
                 topic_mapping: str | None = None) -> dict[str, str]:
    """``interpkit data``: validate the options and export ``kind`` (permutations | topic)."""
    from interpkit.errors import UserError

    checks = [(kind in ("permutations", "topic"), f"--kind {kind!r}; use permutations or topic"),
              (2 <= n <= 9, f"--n {n}; S_n needs 2 <= n <= 9"), (length >= 1, "--length must be >= 1"),
              (stories >= 1, "--stories must be >= 1"), (0 < train_ratio <= 1, "--train-ratio must be in (0, 1]"),
              (topics >= 1 and alpha > 0 and beta > 0, "--topics >= 1, --alpha > 0 and --beta > 0"),
              (topic_mapping is None or kind == "topic", "--topic-mapping needs --kind topic")]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"bad data option: {msg}")
    if kind == "topic":
        return export_topic_dataset(out, stories, length, n, n_topics=topics, alpha=alpha, beta=beta, seed=seed,
                                    train_ratio=train_ratio, topic_mapping=topic_mapping)
    return export_dataset(out, stories, length, n, seed=seed, train_ratio=train_ratio)


def save_split(path: str, stories: Stories) -> None:
    """One split as one compressed .npz (uint8 indices when they fit)."""
    g = stories.group
    dt = np.uint8 if g.size <= 256 else np.int16
    np.savez_compressed(path, n=np.int64(stories.n), perms=np.array(g.perms, dtype=np.int8),
                        actions=stories.actions.numpy().astype(dt), states=stories.states.numpy().astype(dt))


def load_split(path: str) -> Stories:
    """Inverse of ``save_split``."""
    with np.load(path) as z:
        n = int(z["n"])
        if tuple(map(tuple, z["perms"].tolist())) != symmetric_group(n).perms:
            raise ValueError(f"{path}: permutation order differs from this version's S_{n}")
        return Stories(n=n, actions=torch.from_numpy(z["actions"].astype(np.int64)),
                       states=torch.from_numpy(z["states"].astype(np.int64)))


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------
def build_tokenizer(n: int = 3, add_bos: bool = False):
    """A word-level tokenizer for models trained from scratch: one token per permutation string.

    Vocabulary (fixed order): <pad> <bos> <eos> <unk>, "0" "1" (parity labels), then the n!
    permutation strings in ``symmetric_group(n)`` order. Whitespace pre-tokenizer; with ``add_bos``
    a post-processor puts <bos> in front of every text (``add_special_tokens=True``, the default of
    ``tokenizer(text)``), so analyses that tokenize story text get the same input as training.
    Fully deterministic: built from the list, not trained.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [PAD, BOS, EOS, UNK, *PARITY_TOKENS, *symmetric_group(n).strings]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                          special_tokens=[(BOS, vocab.index(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, model_max_length=4096, clean_up_tokenization_spaces=False)


def add_permutation_tokens(tokenizer, model=None, n: int = 3) -> int:
    """Add every permutation string of S_n, bare ("213") and space-prefixed (" 213"), as single tokens
    to a hub tokenizer (and resize ``model``'s embeddings); sets pad = eos when there is no pad.
    Returns the number of tokens added."""
    from tokenizers import AddedToken

    strings = symmetric_group(n).strings
    new = [AddedToken(s, normalized=False, lstrip=False, rstrip=False) for s in strings]
    new += [AddedToken(" " + s, normalized=False, lstrip=False, rstrip=False) for s in strings]
    added = tokenizer.add_tokens(new)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.resize_token_embeddings(len(tokenizer))
    return added


def perm_token_ids(tokenizer, n: int = 3, space: bool = True) -> torch.Tensor:
    """[P] token id of each permutation (space-prefixed form when ``space``); raises if a permutation
    is not a single token."""
    ids = []
    for s in symmetric_group(n).strings:
        enc = tokenizer.encode((" " if space else "") + s, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"permutation {s!r} is {len(enc)} tokens for this tokenizer; "
                             f"call add_permutation_tokens(tokenizer, model, n={n}) first")
        ids.append(enc[0])
    return torch.tensor(ids, dtype=torch.long)


def special_prefix(tokenizer, n: int = 3) -> list[int]:
    """Token ids the tokenizer puts before a story by itself (e.g. [<bos>]); [] for GPT-2-style ones."""
    first = symmetric_group(n).strings[0]
    bare = tokenizer.encode(first, add_special_tokens=False)
    full = tokenizer.encode(first)
    return full[:full.index(bare[0])] if bare and bare[0] in full else []


def encode_actions(actions: torch.Tensor, tokenizer, n: int = 3, add_special_tokens: bool = True) -> torch.Tensor:
    """[N, T] action indices -> token ids exactly as ``tokenizer(story_text)`` gives them: first
    action bare, the rest space-prefixed, after the tokenizer's special prefix (BOS) if it adds one.
    Position t of the story is column ``len(special_prefix(tokenizer)) + t``."""
    bare, spaced = perm_token_ids(tokenizer, n, space=False), perm_token_ids(tokenizer, n, space=True)
    ids = spaced[actions]
    ids[..., 0] = bare[actions[..., 0]]
    prefix = special_prefix(tokenizer, n) if add_special_tokens else []
    if prefix:
        ids = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(*ids.shape[:-1], len(prefix)), ids], -1)
    return ids


# --------------------------------------------------------------------------------------------------
# PromptSet for the analyses
# --------------------------------------------------------------------------------------------------
def story_tokens(actions: torch.Tensor, tokenizer, n: int = 3,
                 scratchpad: bool = False) -> tuple[torch.Tensor, list[str], int, int]:
    """(input_ids, texts, column of the first action, column of the last action) of stories, plain or
    with the true states as a scratchpad (``scratchpad_sequence``)."""
    seq = scratchpad_sequence(actions, n) if scratchpad else actions
    ids = encode_actions(seq, tokenizer, n)
    offset = ids.shape[1] - seq.shape[-1]
    return ids, stories_to_text(seq, n), offset + int(scratchpad), ids.shape[1] - 1


def story_prompt_set(tokenizer, n_stories: int = 100, length: int = 16, n: int = 3, *, seed: int = 0,
                     wrong: str = "others", scratchpad: bool = False):
    """Stories as a PromptSet: prompts = action strings, answer = the final state's (space-prefixed)
    token, role "last" = the final position, "first" = the first action (after a BOS, if any). ``wrong="others"`` lists every other state as wrong ids.
    ``scratchpad``: the true states interleaved (the format of models trained with a scratchpad).

    meta: "states" and "actions" (index lists per story), "parity" (final-state parity).
    """
    from interpkit.tasks.base import PromptSet

    st = sample_stories(n_stories, length, n, seed=seed)
    ids, texts, first, last = story_tokens(st.actions, tokenizer, n, scratchpad)
    state_ids = perm_token_ids(tokenizer, n, space=True)
    final = st.states[:, -1]
    wrong_ids = None
    if wrong == "others":
        P = symmetric_group(n).size
        others = torch.arange(P).expand(n_stories, P)
        others = others[others != final[:, None]].view(n_stories, P - 1)
        wrong_ids = state_ids[others]
    return PromptSet(
        task=f"permutations-s{n}", prompts=texts, input_ids=ids,
        attention_mask=torch.ones_like(ids), answer_ids=state_ids[final][:, None], wrong_ids=wrong_ids,
        roles={"last": torch.full((n_stories,), last, dtype=torch.long),
               "first": torch.full((n_stories,), first, dtype=torch.long)},
        meta={"states": st.states.tolist(), "actions": st.actions.tolist(),
              "parity": st.parities[:, -1].tolist()},
    )


def parity_pairs(tokenizer, n_stories: int = 64, length: int = 16, n: int = 3, *, seed: int = 0,
                 parity: str = "both", scratchpad: bool = False) -> PromptSet:
    """Original stories and altered copies whose first action has the same ("same") or the other
    ("diff") parity; "both" alternates them. meta["pair_parity"] says which each row is.
    ``scratchpad``: each story carries its own true states (``scratchpad_sequence``)."""
    from interpkit.tasks.base import PromptSet

    g = symmetric_group(n)
    st = sample_stories(n_stories, length, n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    kinds = ["same" if (i % 2 == 0 if parity == "both" else parity == "same") else "diff" for i in range(n_stories)]
    altered = st.actions.clone()
    for i, kind in enumerate(kinds):
        a0 = int(st.actions[i, 0])
        pool = [a for a in range(g.size) if a != a0 and (g.parity[a] == g.parity[a0]) == (kind == "same")]
        altered[i, 0] = pool[int(torch.randint(len(pool), (1,), generator=gen))]
    states_alt = run_states(altered, n)
    state_ids = perm_token_ids(tokenizer, n, space=True)
    ids, texts, first, last = story_tokens(st.actions, tokenizer, n, scratchpad)
    alt_ids, alt_texts, _, _ = story_tokens(altered, tokenizer, n, scratchpad)
    return PromptSet(
        task=f"permutations-s{n}-pairs", prompts=texts, input_ids=ids, attention_mask=torch.ones_like(ids),
        answer_ids=state_ids[st.states[:, -1]][:, None], wrong_ids=state_ids[states_alt[:, -1]][:, None],
        corrupted_prompts=alt_texts, corrupted_ids=alt_ids, corrupted_mask=torch.ones_like(alt_ids),
        roles={"last": torch.full((n_stories,), last, dtype=torch.long),
               "first": torch.full((n_stories,), first, dtype=torch.long)},
        meta={"pair_parity": kinds, "states": st.states.tolist()},
    )


def build(tokenizer, n: int = 64, seed: int = 0, *, length: int = 8, group: int = 3, parity: str = "both"):
    """The registry's builder: ``n`` patching pairs of S_``group`` stories of ``length`` actions whose
    first action is replaced by one of the same/other parity (``parity``: same | diff | both)."""
    return parity_pairs(tokenizer, n, length, group, seed=seed, parity=parity)
