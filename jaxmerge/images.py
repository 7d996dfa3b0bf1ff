"""Image preprocessing for LLaVA and LLaVA-NeXT, equal to transformers' (PIL) image processors.

`ImageProcessing.from_pretrained(checkpoint)` reads the checkpoint's saved processor
settings; `preprocess(images)` returns `pixel_values` (and `image_sizes` for LLaVA-NeXT)
exactly as `AutoImageProcessor` (the PIL backend) does, so a jaxmerge user needs neither
torch nor torchvision to feed a VLM. Steps, per transformers:

  CLIP (LLaVA):   RGB -> resize the shortest edge (bicubic) -> centre crop -> x/255 ->
                  (x - mean) / std -> [I, 3, H, W]
  LLaVA-NeXT:     the whole image resized to a square, then the image resized to fit the
                  best of `image_grid_pinpoints` (aspect kept), zero-padded to it and cut
                  into square tiles; each tile as CLIP; images zero-padded to a common tile
                  count -> [I, P, 3, H, W], and image_sizes [I, 2] (height, width).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from jaxmerge.models.llava import select_best_resolution

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL's resampling code: bicubic
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT's tiling; None for CLIP

    @classmethod
    def from_dict(cls, d: dict, source: str = "image processor config") -> ImageProcessing:
        size = d.get("size") or {}
        crop = d.get("crop_size") or {}
        if not isinstance(size, dict) or "shortest_edge" not in size:
            raise ValueError(f"{source}: size {size!r} has no shortest_edge (only CLIP-style processors are supported)")
        if crop and min(int(crop.get("height", 0)), int(crop.get("width", 0))) > int(size["shortest_edge"]):
            raise ValueError(f"{source}: crop_size {crop} is larger than size {size}")
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise ValueError(f"{source}: {flag}=false is not supported")
        pinpoints = d.get("image_grid_pinpoints")
        return cls(shortest_edge=int(size["shortest_edge"]),
                   crop_size=(int(crop.get("height", size["shortest_edge"])),
                              int(crop.get("width", size["shortest_edge"]))),
                   image_mean=tuple(d.get("image_mean", CLIP_MEAN)), image_std=tuple(d.get("image_std", CLIP_STD)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)), resample=int(d.get("resample", 3)),
                   image_grid_pinpoints=tuple(tuple(int(x) for x in p) for p in pinpoints) if pinpoints else None)

    @classmethod
    def from_pretrained(cls, directory) -> ImageProcessing:
        """From preprocessor_config.json (transformers 4) or processor_config.json's
        image_processor (transformers 5) in a checkpoint directory."""
        directory = Path(directory)
        legacy, combined = directory / "preprocessor_config.json", directory / "processor_config.json"
        if legacy.is_file():
            return cls.from_dict(json.loads(legacy.read_text()), str(legacy))
        if combined.is_file():
            d = json.loads(combined.read_text())
            if "image_processor" in d:
                return cls.from_dict(d["image_processor"], f"{combined} (image_processor)")
        raise FileNotFoundError(f"{directory}: no preprocessor_config.json or processor_config.json with an "
                                "image_processor")

    def preprocess(self, images) -> dict[str, np.ndarray]:
        """images: PIL images or uint8 [H, W, 3] arrays. -> {"pixel_values": float32 [I, 3, H, W]}
        (CLIP) or {"pixel_values": [I, P, 3, H, W], "image_sizes": int64 [I, 2]} (LLaVA-NeXT)."""
        arrays = [to_rgb(image) for image in images]  # [3, H, W] uint8 each
        if self.image_grid_pinpoints is None:
            return {"pixel_values": np.stack([self._clip(a) for a in arrays]).astype(np.float32)}
        tiles = [np.stack([self._clip(t) for t in self._anyres_tiles(a)]) for a in arrays]
        count = max(len(t) for t in tiles)
        pixel_values = np.stack([np.pad(t, ((0, count - len(t)), (0, 0), (0, 0), (0, 0))) for t in tiles])
        return {"pixel_values": pixel_values.astype(np.float32),
                "image_sizes": np.array([a.shape[1:] for a in arrays], np.int64)}

    def _clip(self, image: np.ndarray) -> np.ndarray:
        """[3, H, W] uint8 -> [3, crop H, crop W] float32: resize, crop, rescale, normalise."""
        height, width = image.shape[1:]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        image = resize(image, (new_long, new_short) if width <= height else (new_short, new_long), self.resample)
        image = center_crop(image, self.crop_size)
        image = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)[:, None, None]
        std = np.asarray(self.image_std, np.float32)[:, None, None]
        return (image - mean) / std

    def _anyres_tiles(self, image: np.ndarray) -> list[np.ndarray]:
        """The whole image as a square, then the tiles of its best grid, row by row."""
        height, width = image.shape[1:]
        target_h, target_w = select_best_resolution((height, width), self.image_grid_pinpoints)
        if target_w / width < target_h / height:
            new_h, new_w = min(math.ceil(height * target_w / width), target_h), target_w
        else:
            new_h, new_w = target_h, min(math.ceil(width * target_h / height), target_w)
        fitted = resize(image, (new_h, new_w), self.resample)
        top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
        padded = np.pad(fitted, ((0, 0), (top, target_h - new_h - top), (left, target_w - new_w - left)))
        side = self.crop_size[0]
        tiles = [padded[:, y:y + side, x:x + side] for y in range(0, target_h, side) for x in range(0, target_w, side)]
        return [resize(image, (self.shortest_edge, self.shortest_edge), self.resample)] + tiles


def to_rgb(image) -> np.ndarray:
    """[3, H, W] uint8; transparency composited onto white, as transformers does."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image arrays must be uint8 [height, width, 3], got {image.dtype} {image.shape}")
        return np.moveaxis(image, -1, 0)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return np.moveaxis(np.array(image.convert("RGB")), -1, 0)


def resize(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """[3, H, W] uint8 -> [3, height, width] uint8 with PIL (what transformers uses)."""
    pil = Image.fromarray(np.moveaxis(image, 0, -1))
    return np.moveaxis(np.array(pil.resize((size[1], size[0]), resample=resample)), -1, 0)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centre [3, height, width] of an image at least that large (after resizing the
    shortest edge to at least the crop, it always is)."""
    height, width = image.shape[1:]
    crop_h, crop_w = size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[:, top:top + crop_h, left:left + crop_w]
