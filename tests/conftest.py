"""Tiny random Hugging Face models, made with transformers' PyTorch classes, as oracles."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

# No persistent XLA cache in tests, in this process (`jaxmerge.cli.main` would enable it) or
# in the commands they start: several tests kill processes on purpose, and JAX writes cache
# entries in place, so a process killed mid-write could leave an entry that crashes the next
# reader; and host-device counts differ between tests' processes.
os.environ["JAXMERGE_CACHE_DIR"] = "off"

VOCAB = 96

# Parity is checked in true fp32, also where an accelerator would default to TF32/bf16 passes.
jax.config.update("jax_default_matmul_precision", "highest")

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
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    model_class, config_class, fields = CONFIGS[name]
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  bos_token_id=1, eos_token_id=2, **fields)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).eval()
    with torch.no_grad():  # transformers zero-initialises biases; make them matter
        for name_, p in model.named_parameters():
            if name_.endswith("bias") or "norm" in name_:
                p.add_(torch.randn_like(p) * 0.1)
    return model


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


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, VOCAB, (batch, length)).astype(np.int32)
