"""Our image preprocessing against transformers' image processors (PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor, LlavaNextImageProcessorPil

from jaxmerge.images import ImageProcessing

SIZES = [(30, 40), (64, 28), (90, 90), (47, 33), (20, 100), (28, 28), (200, 7), (13, 150)]  # (width, height)


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    out.append(Image.fromarray(rng.integers(0, 256, (50, 37, 4), dtype=np.uint8), "RGBA"))  # transparency
    out.append(Image.fromarray(rng.integers(0, 256, (41, 60), dtype=np.uint8), "L"))  # greyscale
    return out


@pytest.mark.parametrize("side", [28, 33])
def test_clip_preprocessing_equals_transformers(side, tmp_path):
    theirs = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    theirs.save_pretrained(tmp_path)
    ours = ImageProcessing.from_pretrained(tmp_path)
    expected = np.asarray(theirs(images(), return_tensors="np")["pixel_values"])
    got = ours.preprocess(images())["pixel_values"]
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_llava_next_preprocessing_equals_transformers(tmp_path):
    theirs = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]])
    theirs.save_pretrained(tmp_path)
    ours = ImageProcessing.from_pretrained(tmp_path)
    assert ours.image_grid_pinpoints is not None
    expected = theirs(images(1), return_tensors="np")
    got = ours.preprocess(images(1))
    np.testing.assert_array_equal(got["image_sizes"], expected["image_sizes"])
    assert got["pixel_values"].shape == expected["pixel_values"].shape
    np.testing.assert_allclose(got["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)


def test_settings_we_cannot_match_are_refused(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"height": 28, "width": 28}}')
    with pytest.raises(ValueError, match="preprocessor_config.json.*shortest_edge"):
        ImageProcessing.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        ImageProcessing.from_pretrained(tmp_path / "nowhere")


def test_a_saved_llava_processor_is_read(tmp_path):
    """The toy VLM ships a transformers LlavaProcessor (processor_config.json): our
    preprocessing from its settings equals the toy world's own."""
    from jaxmerge.testing import toy_vlm_world as tv

    ours = ImageProcessing.from_pretrained(tv.SHIPPED / "vlm_seed0" / "vlm")
    rng = np.random.default_rng(0)
    drawn = np.stack([tv.draw(tv.random_scene(rng), rng) for _ in range(4)])
    np.testing.assert_allclose(ours.preprocess(list(drawn))["pixel_values"], tv.pixel_values(drawn), atol=1e-6)
