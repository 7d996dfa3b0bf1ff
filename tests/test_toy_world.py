"""The toy world's building blocks: a character tokenizer transformers opens, templates,
and training that leaves fine-tunes as small deltas saved as real HF checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import hf_logits
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

import jaxmerge
from jaxmerge.merge import flat_params
from jaxmerge.testing import toy_world as tw


def test_tokenizer_round_trips_both_languages(tmp_path):
    tw.build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    for template in tw.TEMPLATES.values():
        prompt, answer = template(rng)
        ids = tokenizer(prompt + answer, add_special_tokens=False).input_ids
        assert len(ids) == len(prompt + answer) and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == prompt + answer


def test_templates():
    rng = np.random.default_rng(0)
    prompt, answer = tw.japanese_math(rng)
    a, b = [int(c) for c in prompt if c.isdigit()]
    assert answer == f"{a + b}こ" and prompt.endswith("答:")
    assert all(t in tw.TEMPLATES for mix in tw.MIXES.values() for t in mix)
    assert not any("japanese_math" in mix for mix in tw.MIXES.values())  # the target is never trained on


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    short = {"base": tw.TrainConfig(steps=40, learning_rate=3e-3, batch_size=16, length=64),
             "japanese": tw.TrainConfig(steps=10, learning_rate=1e-3, batch_size=16, length=64, pull=1e-2),
             "math": tw.TrainConfig(steps=10, learning_rate=1e-3, batch_size=16, length=64, pull=1e-2)}
    small = dataclasses.replace(tw.MODEL, num_layers=2, hidden_size=32, intermediate_size=64, head_dim=8)
    return tw.build_world(tmp_path_factory.mktemp("world"), seed=0, training=short, model=small)


def test_world_checkpoints_open_in_transformers(world):
    for path in world.values():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = np.asarray([tokenizer("問:トムは", add_special_tokens=False).input_ids])
        np.testing.assert_allclose(np.asarray(jaxmerge.load(path)(ids)), hf_logits(model, ids), atol=1e-4)


def test_training_learns_and_fine_tunes_stay_close(world):
    base = flat_params(jaxmerge.load(world["base"]))
    for name in ("japanese", "math"):
        tuned = flat_params(jaxmerge.load(world[name]))
        delta = np.sqrt(sum(float(np.sum((np.asarray(tuned[p]) - np.asarray(base[p])) ** 2)) for p in base))
        size = np.sqrt(sum(float(np.sum(np.asarray(base[p]) ** 2)) for p in base))
        assert 0 < delta < 0.1 * size, f"{name}: task vector {delta:.3f} vs base {size:.3f}"


def test_training_reduces_loss():
    tokenizer = tw.build_tokenizer()
    config = dataclasses.replace(tw.MODEL, vocab_size=len(tokenizer), num_layers=1, hidden_size=32,
                                 intermediate_size=64, head_dim=8)
    _, losses = tw.train(tw.Transformer(config, rngs=nnx.Rngs(0)), tokenizer, tw.MIXES["base"],
                         tw.TrainConfig(steps=60, learning_rate=3e-3, batch_size=16, length=64), seed=0)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
