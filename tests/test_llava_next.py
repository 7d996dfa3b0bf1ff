"""LLaVA-NeXT in Flax against transformers' LlavaNextForConditionalGeneration: tiny random
models, real images of several sizes and aspect ratios through transformers' own
LlavaNextProcessor (anyres tiles, unpadding, image_newline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    MistralConfig,
)

import jaxmerge
from jaxmerge.models.llava import anyres_feature_index, anyres_grid, select_best_resolution
from jaxmerge.testing.toy_vlm_world import build_tokenizer

SIDE, PATCH = 28, 7  # 16 features per tile
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
SIZES = [(30, 40), (64, 28), (90, 90), (47, 33), (20, 100), (28, 28)]  # (width, height)

NEXT_CONFIGS = {
    "mistral": dict(text="mistral", vision_feature_layer=-2),
    "llama_two_layers": dict(text="llama", vision_feature_layer=[-3, -1]),
}


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    images = LlavaNextImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                        image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)


def make_next(name: str, tokenizer, seed: int = 0) -> LlavaNextForConditionalGeneration:
    fields = dict(NEXT_CONFIGS[name])
    text_class = MistralConfig if fields.pop("text") == "mistral" else LlamaConfig
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=SIDE, patch_size=PATCH)
    text = text_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **fields)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # zero biases and unit norms would hide mistakes
        for param_name, p in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def images(sizes, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def torch_inputs(batch) -> dict:
    return {k: torch.tensor(np.asarray(v)) for k, v in batch.items()}


@pytest.mark.parametrize("name", list(NEXT_CONFIGS))
def test_llava_next_logits_equal_transformers_per_image_size(name, processor, tmp_path):
    hf = make_next(name, processor.tokenizer)
    hf.save_pretrained(tmp_path / name)
    model = jaxmerge.load(tmp_path / name)
    assert model.config.is_next
    for size in SIZES:
        batch = processor(images=images([size]), text=["<image>Q:which column? A:"], return_tensors="np")
        with torch.no_grad():
            theirs = hf(**torch_inputs(batch)).logits.numpy()
        ours = np.asarray(model(batch["input_ids"], pixel_values=batch["pixel_values"],
                                image_sizes=batch["image_sizes"]))
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=f"image size {size}")


def test_llava_next_two_images_in_one_prompt_and_greedy_tokens(processor, tmp_path):
    hf = make_next("mistral", processor.tokenizer, seed=1)
    hf.save_pretrained(tmp_path / "m")
    model = jaxmerge.load(tmp_path / "m")
    # One prompt with two images of different shapes: their tiles are zero-padded to a common count.
    batch = processor(images=images(SIZES[:2], seed=1), text=["<image>a<image>Q:which column? A:"],
                      return_tensors="np")
    tiles = [1 + np.prod(anyres_grid(model.config, tuple(size))) for size in batch["image_sizes"]]
    assert tiles[0] != tiles[1] and batch["pixel_values"].shape[1] == max(tiles)
    with torch.no_grad():
        theirs = hf(**torch_inputs(batch)).logits.numpy()
    ours = np.asarray(model(batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # Two rows of different lengths, left-padded, greedy decoding.
    batch = processor(images=images([SIZES[2], SIZES[4]], seed=2), text=["<image>Q:which column? A:", "<image>あ"],
                      return_tensors="np", padding=True)
    with torch.no_grad():
        expected = hf.generate(**torch_inputs(batch), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=processor.tokenizer.pad_token_id).numpy()
    got = jaxmerge.generate(model, batch["input_ids"], 8, attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_feature_layout_matches_the_processors_token_count(processor, tmp_path):
    """The layout computed from image_sizes holds exactly the image tokens the processor
    expanded `<image>` into, for many sizes (the unpadding's rounding included)."""
    hf = make_next("mistral", processor.tokenizer)
    hf.save_pretrained(tmp_path / "m")
    config = jaxmerge.load(tmp_path / "m").config
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    rng = np.random.default_rng(0)
    for _ in range(40):
        size = (int(rng.integers(5, 200)), int(rng.integers(5, 200)))
        batch = processor(images=images([size]), text=["<image>"], return_tensors="np")
        index = anyres_feature_index(config, batch["image_sizes"], batch["pixel_values"].shape[1])
        assert len(index) == int(np.sum(batch["input_ids"] == image_token)), size
        assert select_best_resolution(tuple(batch["image_sizes"][0]), PINPOINTS) is not None


def test_llava_next_transformers_5_layout_and_save_reopen(processor, tmp_path):
    hf = make_next("llama_two_layers", processor.tokenizer, seed=3)
    hf.save_pretrained(tmp_path / "v4")
    (tmp_path / "v5").mkdir()
    (tmp_path / "v5" / "config.json").write_text((tmp_path / "v4" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "v5" / "model.safetensors")
    assert "model.image_newline" in hf.state_dict()
    batch = processor(images=images([SIZES[3]]), text=["<image>Q:"], return_tensors="np")
    inputs = dict(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    a = np.asarray(jaxmerge.load(tmp_path / "v4")(batch["input_ids"], **inputs))
    b = np.asarray(jaxmerge.load(tmp_path / "v5")(batch["input_ids"], **inputs))
    np.testing.assert_array_equal(a, b)

    jaxmerge.save(jaxmerge.load(tmp_path / "v5"), tmp_path / "out")
    again = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        theirs = again(**torch_inputs(batch)).logits.numpy()
    np.testing.assert_allclose(a, theirs, atol=1e-4, rtol=0)


def test_llava_next_input_errors(processor, tmp_path):
    hf = make_next("mistral", processor.tokenizer)
    hf.save_pretrained(tmp_path / "m")
    model = jaxmerge.load(tmp_path / "m")
    batch = processor(images=images([SIZES[0]]), text=["<image>Q:"], return_tensors="np")
    with pytest.raises(ValueError, match="image_sizes"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"\[images, tiles"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"][:, 0], image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="image tokens"):
        jaxmerge.generate(model, batch["input_ids"][:, 1:], 2, pixel_values=batch["pixel_values"],
                          image_sizes=batch["image_sizes"])
    with pytest.raises(ValueError, match="tiles"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"][:, :1], image_sizes=batch["image_sizes"])
