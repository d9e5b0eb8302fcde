"""Tokenizers for the built-in tiny models, trained locally and deterministically on ``tasks.corpus()``.

Two styles, like the real families they stand in for:

- ``"bpe"``: GPT-2-like byte-level BPE, no BOS (tiny gpt2 / neox). ``<|endoftext|>`` is bos/eos/unk,
  ``<|pad|>`` pads.
- ``"sentencepiece"``: Llama/Gemma/Mistral-like BPE on "▁"-marked words (Metaspace), byte fallback
  (``<0x00>``..``<0xFF>``), ``<s>`` prepended to every text; ``<unk>``, ``<s>``, ``</s>``, ``<pad>``.

Both pre-tokenize like GPT-2 (letters, digits, punctuation and whitespace runs apart; a word keeps its
leading space / "▁") with one change for numbers: a digit run of exactly 3 or 5 digits stays whole (so
S3/S5 permutation strings such as " 213" are single tokens) and any other run splits into pairs from the
left, so " 1732" is " 17" + "32" as the Greater-Than task needs. The task words (``tasks.vocab_words()``)
are weighted up in training so every name, day, month, number word, pronoun and permutation is one token.
"""
from __future__ import annotations

import functools
import json

from interpkit.errors import UserError

STYLES = ("bpe", "sentencepiece")
VOCAB_SIZE = 6144
WORD_WEIGHT = 50  # how often each task word is repeated in the training data

_NUM = r"S?(?<!\p{N})\p{N}{3}(?!\p{N})|S?(?<!\p{N})\p{N}{5}(?!\p{N})|S?\p{N}{1,2}"
_PATTERN = {
    "bpe": r"'(?:s|t|re|ve|m|ll|d)| ?\p{L}+|" + _NUM.replace("S?", " ?") + r"| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "sentencepiece": r"'(?:s|t|re|ve|m|ll|d)|▁?\p{L}+|" + _NUM.replace("S?", "▁?")
                     + r"|▁?[^\s\p{L}\p{N}▁]+|▁+(?=▁)|▁+|\s+",
}
_SPECIALS = {
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": "<|pad|>"},
    "sentencepiece": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
}


def _training_lines() -> list[str]:
    from interpkit import tasks

    words = tasks.vocab_words()
    return tasks.corpus() + [" ".join(words)] * WORD_WEIGHT


def _train(style: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    split = pre_tokenizers.Split(Regex(_PATTERN[style]), behavior="isolated")
    specials = list(dict.fromkeys(_SPECIALS[style].values()))
    if style == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                     use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False), split])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = []
    size = VOCAB_SIZE - (256 if style == "sentencepiece" else 0)  # room for the byte-fallback tokens
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_training_lines(), trainer)
    if style == "sentencepiece":
        tok = _with_byte_tokens(tok, len(specials))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def _with_byte_tokens(tok, n_special: int):
    """The same BPE with <0x00>..<0xFF> right after the special tokens, as SentencePiece byte fallback has."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    ordered = sorted(vocab, key=vocab.get)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    ordered = ordered[:n_special] + byte_tokens + [t for t in ordered[n_special:] if t not in set(byte_tokens)]
    data["model"]["vocab"] = {t: i for i, t in enumerate(ordered)}
    return Tokenizer.from_str(json.dumps(data))


@functools.lru_cache(maxsize=None)
def tokenizer_json(style: str) -> str:
    """The trained tokenizer of ``style`` as tokenizer.json text (built once per process)."""
    if style not in STYLES:
        raise UserError(f"unknown tokenizer style {style!r}; use one of: {', '.join(STYLES)}")
    return _train(style).to_str()


def build_tokenizer(style: str = "bpe"):
    """A fresh ``PreTrainedTokenizerFast`` of ``style`` ("bpe" or "sentencepiece"); same vocabulary every call."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json(style)),
                                  padding_side="left", model_max_length=4096, **_SPECIALS[style])
    return tok
