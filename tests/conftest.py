"""Tiny random Hugging Face models, made with transformers' PyTorch classes, as oracles."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# No persistent XLA cache in tests, in this process (`jaxmerge.cli.main` would enable it) or
# in the commands they start: several tests kill processes on purpose, and JAX writes cache
# entries in place, so a process killed mid-write could leave an entry that crashes the next
# reader; and host-device counts differ between tests' processes.
os.environ["JAXMERGE_CACHE_DIR"] = "off"

# This process (a pytest worker, never killed, compiling one program at a time) does keep
# compiled programs on disk, in a directory of its own: tests that run the same search or
# evaluation on the same toy shapes (each with fresh jitted closures, so JAX's in-memory
# cache misses) compile it once; compilation is most of a toy run's time on a CPU.
_COMPILED = tempfile.mkdtemp(prefix="jaxmerge-tests-xla-")
atexit.register(shutil.rmtree, _COMPILED, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILED)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

VOCAB = 96

# Parity is checked in true fp32, also where an accelerator would default to TF32/bf16 passes.
jax.config.update("jax_default_matmul_precision", "highest")


def _visible(**fields) -> dict:
    """Weights of std 0.1 rather than transformers' 0.02: attention scores and logits are then
    large enough that RoPE scaling, softcapping and the attention scale change the logits by
    far more than the tests' tolerance (at 0.02, attention is nearly uniform)."""
    return dict(initializer_range=0.1, **fields)


# Each entry: (transformers class, config class, config fields). Small enough to run in
# well under a second, and together covering every code path of the Flax model.
CONFIGS = {
    "mistral_gqa": (MistralForCausalLM, MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral_mqa": (MistralForCausalLM, MistralConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
    "mistral_sliding": (MistralForCausalLM, MistralConfig,
                        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=4)),
    "llama_tied_theta": (LlamaForCausalLM, LlamaConfig,
                         dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                              rope_theta=500_000.0)),
    "llama_head_dim_bias": (LlamaForCausalLM, LlamaConfig,
                            dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 attention_bias=True, mlp_bias=True)),
    "llama3_rope": (LlamaForCausalLM, LlamaConfig,
                    dict(num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=16),
                         max_position_embeddings=64)),
    # Qwen2: bias on q/k/v (never on o_proj), RMSNorm, SiLU MLP.
    "qwen2_bias_tied": (Qwen2ForCausalLM, Qwen2Config,  # small Qwen2.5 sizes tie the embeddings
                        _visible(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 rope_theta=1_000_000.0)),
    # transformers keeps sliding_window only with use_sliding_window, and slides the layers
    # >= max_window_layers: layer_types [full, sliding, sliding].
    "qwen2_sliding": (Qwen2ForCausalLM, Qwen2Config,
                      _visible(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                               sliding_window=4, max_window_layers=1)),
    "qwen2_yarn": (Qwen2ForCausalLM, Qwen2Config,
                   _visible(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    # Dynamic NTK scales the base once a sequence is longer than max_position_embeddings (8):
    # the 12-token test sequences are.
    "qwen2_dynamic": (Qwen2ForCausalLM, Qwen2Config,
                      _visible(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                               rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    # Qwen3: RMSNorm of each head's q and k, head_dim independent of hidden / heads;
    # attention_bias puts a bias on o_proj too.
    "qwen3_head_dim_tied": (Qwen3ForCausalLM, Qwen3Config,
                            _visible(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     tie_word_embeddings=True)),
    "qwen3_bias": (Qwen3ForCausalLM, Qwen3Config,
                   _visible(num_attention_heads=4, num_key_value_heads=1, head_dim=16, attention_bias=True)),
    "qwen3_sliding": (Qwen3ForCausalLM, Qwen3Config,
                      _visible(num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                               sliding_window=4, max_window_layers=1)),
    # Gemma2: (1 + w) norms, norms before and after attention and MLP, embeddings scaled by
    # sqrt(hidden), 1/sqrt(query_pre_attn_scalar) attention scale, tanh softcapping of attention
    # scores and of logits (caps small enough to change them), GELU (tanh), tied embeddings;
    # layer_types alternate sliding, full, sliding.
    "gemma2_softcap": (Gemma2ForCausalLM, Gemma2Config,
                       _visible(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                                attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4)),
    "gemma2_plain": (Gemma2ForCausalLM, Gemma2Config,  # no softcapping, untied, MQA, explicit layer_types
                     _visible(num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                              attn_logit_softcapping=None, final_logit_softcapping=None, tie_word_embeddings=False,
                              sliding_window=4, layer_types=["full_attention", "sliding_attention", "full_attention"])),
    # Gemma3 (text): Gemma2's layer plus (1 + w) RMSNorm of q and k, one RoPE per layer type,
    # and no attention softcapping: transformers ignores attn_logit_softcapping.
    "gemma3_rope": (Gemma3ForCausalLM, Gemma3TextConfig,
                    _visible(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                             sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                             rope_parameters=dict(
                                 full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
                                 sliding_attention=dict(rope_type="default", rope_theta=10_000.0)))),
    # Said the transformers 4 way (rope_theta for full layers, rope_local_base_freq for sliding
    # ones, sliding_window_pattern: every 2nd layer full), which transformers turns into
    # rope_parameters per layer type and layer_types [sliding, full, sliding, full].
    "gemma3_softcap": (Gemma3ForCausalLM, Gemma3TextConfig,
                       _visible(num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                                num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2,
                                rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                                final_logit_softcapping=3.0, attn_logit_softcapping=2.0, tie_word_embeddings=False)),
    # Phi3: fused qkv_proj and gate_up_proj. Its default pad_token_id (32000) is outside VOCAB.
    "phi3_gqa": (Phi3ForCausalLM, Phi3Config,
                 _visible(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)),
    "phi3_sliding": (Phi3ForCausalLM, Phi3Config,  # every layer slides
                     _visible(num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, sliding_window=4)),
    "phi3_partial_tied": (Phi3ForCausalLM, Phi3Config,  # RoPE on the first half of each head only (Phi-4-mini-like)
                          _visible(num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                   partial_rotary_factor=0.5, tie_word_embeddings=True)),
    # LongRoPE: short_factor up to original_max_position_embeddings (8) tokens, long_factor
    # beyond (for the whole sequence), cos/sin scaled by sqrt(1 + ln(64/8) / ln 8) in both.
    # Phi3 takes original_max_position_embeddings from its top-level field.
    "phi3_longrope": (Phi3ForCausalLM, Phi3Config,
                      _visible(num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                               max_position_embeddings=64, original_max_position_embeddings=8,
                               rope_scaling=dict(rope_type="longrope",  # a factor per rotary frequency (head_dim 16)
                                                 short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                                                 long_factor=[1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0]))),
}


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _bounded_compiled_code():
    """Every compiled XLA:CPU program keeps ~100 memory mappings until JAX's caches drop it;
    the whole suite in one process compiles enough programs to pass Linux's default
    vm.max_map_count (65,530), where the next compilation segfaults inside XLA (it did, at
    the same test every time). Dropping the caches once a process holds many bounds that."""
    yield
    if _memory_maps() > 30_000:
        jax.clear_caches()


def make_hf_model(name: str, seed: int = 0, **overrides):
    model_class, config_class, fields = CONFIGS[name]
    fields = dict(dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       bos_token_id=1, eos_token_id=2), **fields)  # an entry may change these defaults
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).eval()
    with torch.no_grad():  # transformers zero-initialises biases; make them matter
        for name_, p in model.named_parameters():
            if name_.endswith("bias") or "norm" in name_:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_fine_tuned_family(root, scales=(0.02, 0.03, 0.05), name: str = "mistral_gqa", **overrides) -> None:
    """A base (root/base) and one fine-tune per scale (root/ft<i>: base + Gaussian noise of that
    std), as mergekit's users have them: the merge tests' family."""
    make_hf_model(name, seed=0, **overrides).save_pretrained(root / "base")
    for i, scale in enumerate(scales):
        tuned = make_hf_model(name, seed=0, **overrides)
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * scale)
        tuned.save_pretrained(root / f"ft{i}")


def tied_family(name: str = "mistral_gqa", **overrides) -> list:
    """A base and three fine-tunes (models, base first) whose |task vectors| tie at every cut:
    the base on a 2^-10 grid, the first two fine-tunes' task vectors on a 2^-9 grid (a few
    levels), the third's continuous. The merge dtype tests' family."""
    models = []
    for i in range(4):
        model = make_hf_model(name, seed=0, **overrides)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.round(p * 1024) / 1024 + 0.0)  # + 0.0: no -0
                if i == 1:
                    p.add_(torch.round(torch.randn(p.shape, generator=generator) * 1.5) / 512)
                elif i == 2:
                    p.add_(torch.round(torch.randn(p.shape, generator=generator) * 2.0) / 512)
                elif i == 3:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.004)
        models.append(model)
    return models


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: saves a tiny transformers model to a fresh directory; returns (model, dir)."""
    def make(name: str, **kwargs):
        save_kwargs = {k: kwargs.pop(k) for k in ("max_shard_size",) if k in kwargs}
        model = make_hf_model(name, **kwargs)
        directory = tmp_path / name
        model.save_pretrained(directory, **save_kwargs)
        return model, directory
    return make


def hf_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        return model(torch.as_tensor(np.asarray(input_ids)), attention_mask=mask).logits.float().numpy()


def piece_tokenizer(pieces: list[str]) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per piece (specials <pad> <s> </s> <unk> first), splitting
    text into the longest pieces it holds, else single characters; decoding joins them."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + pieces)}
    pattern = "|".join(sorted((p for p in pieces if len(p) > 1), key=len, reverse=True)) + "|."
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, VOCAB, (batch, length)).astype(np.int32)
