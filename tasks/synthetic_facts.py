"""Synthetic facts: invented multi-token subjects, each with one attribute per relation.

"zo ka mi lives in the city of" -> "varo". Subjects are 2-4 syllable tokens, relations are multi-token
phrases that follow the subject, attributes are single tokens. The vocabulary is word-level, so every
word is one token and subject spans are exact for any model built on this tokenizer. Used to train a
small model that really recalls facts (``train_fact_model``) and as the fact set of the tiny-model
tests of causal tracing. Everything is seeded and deterministic.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from interpkit.tasks.base import PromptSet

SPECIALS = ["<pad>", "<bos>", "<unk>"]
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]                       # 70 subject pieces
RELATIONS = {                                                                             # template tail -> attributes
    "city": ("lives in the city of", ["varo", "tesk", "lumba", "orin", "pell", "quas", "dorn", "yelm"]),
    "job": ("works as a", ["baker", "pilot", "tailor", "smith", "medic", "judge", "miner", "poet"]),
    "colour": (", whose favourite colour is", ["red", "blue", "green", "amber", "grey", "violet", "teal", "ochre"]),
    "tongue": ("grew up speaking the language", ["ulvic", "peran", "sotho", "kerr", "mavi", "edish", "tolt", "ruun"]),
}


def vocabulary() -> list[str]:
    words = {w for tail, attrs in RELATIONS.values() for w in tail.split() + attrs}
    return SPECIALS + SYLLABLES + sorted(words)


def build_tokenizer():
    """A word-level fast tokenizer over ``vocabulary()`` (pad and bos ids 0 and 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
    fast.padding_side = "left"
    return fast


@dataclass(frozen=True)
class Fact:
    fact_id: int
    subject: tuple[str, ...]
    relation: str
    attribute: str

    @property
    def prompt(self) -> str:
        return " ".join(self.subject) + " " + RELATIONS[self.relation][0]


def make_facts(n_subjects: int = 150, seed: int = 0, min_len: int = 2, max_len: int = 4) -> list[Fact]:
    """Every subject gets one random attribute per relation; subjects are distinct syllable strings."""
    rng = random.Random(seed)
    subjects: list[tuple[str, ...]] = []
    seen = set()
    while len(subjects) < n_subjects:
        s = tuple(rng.choice(SYLLABLES) for _ in range(rng.randint(min_len, max_len)))
        if s not in seen:
            seen.add(s)
            subjects.append(s)
    facts = []
    for s in subjects:
        for rel, (_, attrs) in RELATIONS.items():
            facts.append(Fact(len(facts), s, rel, rng.choice(attrs)))
    return facts


def prompt_set(tokenizer, facts: list[Fact]) -> PromptSet:
    """Left-padded prompts (with BOS) and roles subject_first / subject_last / last in padded coordinates."""
    vocab = tokenizer.get_vocab()
    missing = sorted({w for f in facts for w in f.prompt.split() + [f.attribute]} - set(vocab))
    if missing or tokenizer.bos_token_id is None:
        from interpkit.errors import UserError

        raise UserError(f"synthetic_facts needs a word-level tokenizer with a BOS token and every syllable as one token "
                        f"(this one lacks {', '.join(missing[:3]) or 'a BOS token'}...); use a model trained on it "
                        f"(artifacts/models/synthetic-facts-gpt2) or --task facts")
    seqs = [[tokenizer.bos_token_id] + [vocab[w] for w in f.prompt.split()] for f in facts]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    pad = torch.tensor([T - len(s) for s in seqs])
    n_subj = torch.tensor([len(f.subject) for f in facts])
    return PromptSet(
        task="synthetic_facts",
        prompts=[f.prompt for f in facts],
        input_ids=ids,
        attention_mask=mask,
        answer_ids=torch.tensor([[vocab[f.attribute]] for f in facts]),
        roles={"subject_first": pad + 1, "subject_last": pad + n_subj, "last": torch.full_like(pad, T - 1)},
        meta={"fact_id": [f.fact_id for f in facts], "subject": [" ".join(f.subject) for f in facts],
              "relation": [f.relation for f in facts], "attribute": [f.attribute for f in facts]},
    )


def _training_rows(tokenizer, facts: list[Fact], orders: int = 6, seed: int = 0):
    """Token rows and labels (-100 = no loss) of the two training formats, left-padded to one width.

    queries: "<bos> subject relation-phrase attribute", loss on the attribute;
    bios: "<bos> subject attr_a attr_b ..." with the subject's attributes in ``orders`` random orders,
    loss on every attribute, so the token after the subject's last token can be any of its attributes.
    """
    vocab = tokenizer.get_vocab()
    bos = tokenizer.bos_token_id
    rows, labels = [], []
    for f in facts:
        ids = [bos] + [vocab[w] for w in f.prompt.split()] + [vocab[f.attribute]]
        rows.append(ids)
        labels.append([-100] * (len(ids) - 1) + [ids[-1]])
    n_query = len(rows)
    by_subject: dict[tuple, dict] = {}
    for f in facts:
        by_subject.setdefault(f.subject, {})[f.relation] = f.attribute
    rng = random.Random(seed)
    for subj, attrs in by_subject.items():
        for _ in range(orders):
            tail = [vocab[a] for a in rng.sample(list(attrs.values()), len(attrs))]
            ids = [bos] + [vocab[w] for w in subj] + tail
            rows.append(ids)
            labels.append([-100] * (1 + len(subj)) + tail)
    W = max(len(r) for r in rows)
    ids = torch.full((len(rows), W), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), W), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), W), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, W - len(r):], lab[i, W - len(r):], mask[i, W - len(r):] = torch.tensor(r), torch.tensor(l), 1
    return ids, lab, mask, n_query


def train_fact_model(facts: list[Fact], *, family: str = "gpt2", n_layers: int = 4, d_model: int = 64,
                     n_heads: int = 4, steps: int = 1000, batch: int = 64, bios: bool = True, lr: float = 3e-3,
                     seed: int = 0, log_every: int = 0):
    """Train a small causal LM to recall ``facts``; returns (hf_model, tokenizer, recall accuracy).

    Each step takes ``batch`` queries and, with ``bios=True``, ``batch`` bios (see ``_training_rows``):
    bios make the token after the subject depend on the subject, the pressure next-token prediction
    puts on real LMs; without them only the last prompt token is ever asked for an attribute.
    Accuracy is greedy top-1 recall of the attribute at the end of every query prompt. Left-padded
    batches use position ids counted from the first real token, as an unpadded prompt would.
    """
    from transformers import AutoModelForCausalLM

    from interpkit.models import tiny_config

    tok = build_tokenizer()
    ids, lab, mask, n_query = _training_rows(tok, facts, seed=seed)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cfg = tiny_config(family, len(tok), n_layers=n_layers, d_model=d_model, n_heads=n_heads)
    cfg.pad_token_id = tok.pad_token_id
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    hf.train()
    for step in range(steps):
        idx = torch.randint(n_query, (batch,), generator=g)
        if bios and len(ids) > n_query:
            idx = torch.cat([idx, n_query + torch.randint(len(ids) - n_query, (batch,), generator=g)])
        logits = hf(input_ids=ids[idx], attention_mask=mask[idx], position_ids=pos[idx]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), lab[idx][:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}")
    hf.eval()
    ps = prompt_set(tok, facts)
    with torch.no_grad():
        p = (ps.attention_mask.cumsum(-1) - 1).clamp_min(0)
        top1 = hf(input_ids=ps.input_ids, attention_mask=ps.attention_mask, position_ids=p,
                  logits_to_keep=1).logits[:, -1].argmax(-1)
    return hf, tok, (top1 == ps.answer_ids[:, 0]).float().mean().item()
