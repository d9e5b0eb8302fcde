"""Permutation tokens added to a hub-style (byte-level BPE) tokenizer and model: the model-building part
of ``tests/unit/test_permutations.py``."""
from __future__ import annotations

import pytest
import torch
from interpkit.tasks.permutations import (
    add_permutation_tokens,
    encode_actions,
    perm_token_ids,
    sample_stories,
)


def test_add_permutation_tokens_to_hub_style_tokenizer():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _local_bpe()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2))
    before = len(tok)
    added = add_permutation_tokens(tok, model, 3)
    assert added == 12 and len(tok) == before + 12
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.pad_token == tok.eos_token
    bare, spaced = perm_token_ids(tok, 3, space=False), perm_token_ids(tok, 3, space=True)
    assert len(set(bare.tolist()) | set(spaced.tolist())) == 12
    st = sample_stories(3, 8, seed=0)
    enc = torch.tensor(tok(st.texts())["input_ids"])
    assert torch.equal(enc, encode_actions(st.actions, tok, 3))
    with pytest.raises(ValueError):
        perm_token_ids(_local_bpe(), 3)


def _local_bpe():
    """A small byte-level BPE tokenizer (GPT-2 style) trained here, standing in for a hub tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat 12 13 21", "numbers 1 2 3 and 123 or 312"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
