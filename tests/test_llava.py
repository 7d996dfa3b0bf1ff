"""LLaVA in Flax against transformers' LlavaForConditionalGeneration (tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
)

import jaxmerge

VOCAB, IMAGE_TOKEN, IMAGE_SIZE, PATCH = 96, 95, 28, 7  # 16 patches per image

LLAVA_CONFIGS = {
    "mistral_default": dict(text="mistral", vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "llama_full_last": dict(text="llama", vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "mistral_two_layers_gelu": dict(text="mistral", vision_feature_layer=[-3, -1], hidden_act="gelu"),
}


def make_llava(name: str, seed: int = 0) -> LlavaForConditionalGeneration:
    fields = dict(LLAVA_CONFIGS[name])
    text_type = fields.pop("text")
    hidden_act = fields.pop("hidden_act", "quick_gelu")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act=hidden_act)
    text_class = MistralConfig if text_type == "mistral" else LlamaConfig
    text = text_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=IMAGE_TOKEN, **fields)).eval()
    with torch.no_grad():  # zero-initialised biases and unit norms would hide mistakes
        for param_name, p in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def images_as_processed(count: int, seed: int = 0) -> np.ndarray:
    """Real images of several sizes and aspect ratios through transformers' CLIP processor."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (28, 64), (90, 90), (33, 47)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:count]]
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                   "width": IMAGE_SIZE})
    return np.asarray(processor(images, return_tensors="np")["pixel_values"], np.float32)


def prompt_ids(features: int, batch: int, seed: int = 0) -> np.ndarray:
    """Per row: BOS, a few words, the image's tokens, a few more words."""
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([[1], rng.integers(3, IMAGE_TOKEN, 3), np.full(features, IMAGE_TOKEN),
                            rng.integers(3, IMAGE_TOKEN, 5)]) for _ in range(batch)]
    return np.stack(rows).astype(np.int32)


def features_per_image(model) -> int:
    full = model.config.vision_feature_select_strategy == "full"
    return (IMAGE_SIZE // PATCH) ** 2 + int(full)


@pytest.mark.parametrize("name", list(LLAVA_CONFIGS))
def test_llava_logits_and_greedy_tokens_equal_transformers(name, tmp_path):
    hf = make_llava(name)
    hf.save_pretrained(tmp_path / name)
    model = jaxmerge.load(tmp_path / name)
    pixels = images_as_processed(2)
    ids = prompt_ids(features_per_image(hf), 2)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels)).logits.numpy()
    ours = np.asarray(model(ids, pixel_values=pixels))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    with torch.no_grad():
        expected = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels),
                               max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    got = np.asarray(jaxmerge.generate(model, ids, 8, pixel_values=pixels))
    np.testing.assert_array_equal(got, expected)


def test_llava_reads_the_transformers_5_layout(tmp_path):
    """The in-memory names of transformers 5 (model.language_model.*, lm_head.*) load too."""
    hf = make_llava("mistral_default", seed=1)
    hf.save_pretrained(tmp_path / "v4")
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "config.json").write_text((tmp_path / "v4" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "v5" / "model.safetensors")
    assert any(k.startswith("model.language_model.") for k in hf.state_dict())
    ids = prompt_ids(features_per_image(hf), 1)
    pixels = images_as_processed(1)
    a = np.asarray(jaxmerge.load(tmp_path / "v4")(ids, pixel_values=pixels))
    b = np.asarray(jaxmerge.load(tmp_path / "v5")(ids, pixel_values=pixels))
    np.testing.assert_array_equal(a, b)


def test_saved_llava_reopens_in_transformers(tmp_path):
    hf = make_llava("llama_full_last", seed=2)
    hf.save_pretrained(tmp_path / "src")
    model = jaxmerge.load(tmp_path / "src")
    jaxmerge.save(model, tmp_path / "out")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, pixels = prompt_ids(features_per_image(hf), 2), images_as_processed(2)
    with torch.no_grad():
        theirs = again(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels)).logits
    np.testing.assert_allclose(np.asarray(model(ids, pixel_values=pixels)), theirs.numpy(), atol=1e-4, rtol=0)


def test_wrong_image_token_count_is_a_clear_error(tmp_path):
    hf = make_llava("mistral_default")
    hf.save_pretrained(tmp_path / "m")
    model = jaxmerge.load(tmp_path / "m")
    ids = prompt_ids(features_per_image(hf) - 1, 1)
    with pytest.raises(ValueError, match="image tokens"):
        jaxmerge.generate(model, ids, 2, pixel_values=images_as_processed(1))
