"""One table of the supported architecture families: how HF names their parts, and how to map them
onto interpkit's uniform site names through nnsight's ``rename=``.

Uniform names (every family): ``embed``, ``layers[i]`` with ``.attn`` (``.attn.o_proj``), ``.mlp``,
``.ln_attn`` (the norm feeding attention), ``final_norm``, ``unembed``.
Adding a family is adding one ``Family`` record here and, if its Q/K layout is new, one weight reader
in ``interpkit/arch.py`` (``QK_READERS``). Nothing else may branch on a family's name
(``tests/unit/test_families.py`` checks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

TINY_SIZES = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_ff")


@dataclass(frozen=True)
class Tiny:
    """The built-in ``tiny:<family>`` model's config: a transformers config class and its arguments.

    ``sizes`` maps config keys to the generic sizes ``interpkit.models.tiny_config`` is asked for
    (``TINY_SIZES``), so one function builds every family's config; ``fixed`` holds constant settings.
    """

    config: str                                    # transformers config class name
    sizes: dict[str, str]                          # config key -> one of TINY_SIZES
    fixed: dict[str, object] = field(default_factory=dict)
    ffn_mult: int = 4                              # d_ff = ffn_mult * d_model
    kv_groups: int = 1                             # n_kv_heads = n_heads // kv_groups (GQA)


@dataclass(frozen=True)
class Family:
    """What differs between architectures, as data.

    Module paths are attribute names as HF spells them: ``decoder`` from the CausalLM (dotted), ``blocks``
    and ``final_norm`` inside the decoder, ``attn`` / ``attn_norm`` / ``post_attn_norm`` inside a block,
    ``o_proj`` / ``qkv`` / ``softcap_attr`` inside the attention module.
    """

    name: str
    model_types: tuple[str, ...]
    rename: dict[str, str]
    norm: str                      # "layernorm" or "rmsnorm"; how the attention input is normalised
    tokenizer: str                 # "bpe" | "sentencepiece": the tiny model's tokenizer (interpkit.tokenizers)
    tiny: Tiny
    norm_offset: float = 0.0       # Gemma's RMSNorm multiplies by (1 + weight)
    rotary: bool = False
    decoder: str = "model"         # the base model: embeddings, blocks, final norm, rotary embedding
    blocks: str = "layers"
    final_norm: str = "norm"
    attn: str = "self_attn"
    attn_norm: str = "input_layernorm"
    post_attn_norm: str | None = None   # norm on the attention output before the residual add (Gemma-2;
                                        # Llama's post_attention_layernorm is the MLP input norm, not this)
    post_mlp_norm: str | None = None    # norm on the MLP output before the residual add (Gemma-2)
    o_proj: str = "o_proj"
    qk_layout: str = "separate"    # "fused_conv1d" | "neox_interleaved" | "separate": how Q and K sit in
                                   # the projection weights (a reader in interpkit.arch.QK_READERS)
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")    # the projection module(s) of that layout
    conv1d: bool = False           # GPT-2's Conv1D: projection weights are stored [d_in, d_out]
    softcap_attr: str | None = None     # attention attribute with the attention-logit soft-cap (Gemma-2)
    hub_examples: tuple[str, ...] = field(default_factory=tuple)

    @property
    def centred_norm(self) -> bool:
        """LayerNorm removes the mean of its input (so Omega may be centred); RMSNorm does not."""
        return self.norm == "layernorm"


_DECODER = {"*.layers": "layers", "self_attn": "attn", "input_layernorm": "ln_attn",
            "*.embed_tokens": "embed", "*.norm": "final_norm", "lm_head": "unembed"}

_DECODER_SIZES = {"vocab_size": "vocab_size", "num_hidden_layers": "n_layers", "hidden_size": "d_model",
                  "num_attention_heads": "n_heads", "intermediate_size": "d_ff"}
_GQA_SIZES = {**_DECODER_SIZES, "num_key_value_heads": "n_kv_heads"}    # 2 KV heads per 4 query heads
_POSITIONS = {"max_position_embeddings": 256}

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2", model_types=("gpt2",), norm="layernorm", tokenizer="bpe",
        rename={"*.h": "layers", "c_proj": "o_proj", "ln_1": "ln_attn", "*.wte": "embed",
                "*.ln_f": "final_norm", "lm_head": "unembed"},
        decoder="transformer", blocks="h", final_norm="ln_f", attn="attn", attn_norm="ln_1", o_proj="c_proj",
        qk_layout="fused_conv1d", qkv=("c_attn",), conv1d=True,
        tiny=Tiny("GPT2Config", sizes={"n_layer": "n_layers", "n_embd": "d_model", "n_head": "n_heads",
                                       "vocab_size": "vocab_size"},
                  fixed=dict(n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             bos_token_id=None, eos_token_id=None)),
        hub_examples=("gpt2", "gpt2-medium", "gpt2-xl"),
    ),
    "neox": Family(
        name="neox", model_types=("gpt_neox",), norm="layernorm", tokenizer="bpe", rotary=True,
        rename={"*.layers": "layers", "attention": "attn", "dense": "o_proj", "input_layernorm": "ln_attn",
                "*.embed_in": "embed", "*.final_layer_norm": "final_norm", "lm_head": "unembed",
                "embed_out": "unembed"},
        decoder="gpt_neox", final_norm="final_layer_norm", attn="attention", o_proj="dense",
        qk_layout="neox_interleaved", qkv=("query_key_value",),
        tiny=Tiny("GPTNeoXConfig", sizes=_DECODER_SIZES, fixed=dict(_POSITIONS, rotary_pct=0.5)),
        hub_examples=("EleutherAI/pythia-70m", "EleutherAI/pythia-160m", "EleutherAI/pythia-1.4b"),
    ),
    "llama": Family(
        name="llama", model_types=("llama",), norm="rmsnorm", tokenizer="sentencepiece", rotary=True,
        rename=dict(_DECODER),
        tiny=Tiny("LlamaConfig", sizes=_GQA_SIZES, fixed=_POSITIONS, ffn_mult=2, kv_groups=2),
        hub_examples=("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-70B"),
    ),
    "gemma2": Family(
        name="gemma2", model_types=("gemma2",), norm="rmsnorm", tokenizer="sentencepiece", norm_offset=1.0,
        rotary=True, rename=dict(_DECODER), post_attn_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm", softcap_attr="attn_logit_softcapping",
        tiny=Tiny("Gemma2Config", sizes={**_GQA_SIZES, "head_dim": "d_head", "query_pre_attn_scalar": "d_head"},
                  fixed=dict(_POSITIONS, sliding_window=256), ffn_mult=2, kv_groups=2),
        hub_examples=("google/gemma-2-2b", "google/gemma-2-9b"),
    ),
    "mistral": Family(
        name="mistral", model_types=("mistral",), norm="rmsnorm", tokenizer="sentencepiece", rotary=True,
        rename=dict(_DECODER),
        tiny=Tiny("MistralConfig", sizes=_GQA_SIZES, fixed=dict(_POSITIONS, sliding_window=None),
                  ffn_mult=2, kv_groups=2),
        hub_examples=("mistralai/Mistral-7B-v0.1",),
    ),
}


def family_for(model_type: str) -> Family:
    """The family of an HF ``config.model_type``; a clear error for anything unsupported."""
    from interpkit.errors import UserError

    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise UserError(f"unsupported architecture {model_type!r}; supported: "
                    f"{', '.join(t for f in FAMILIES.values() for t in f.model_types)}")
