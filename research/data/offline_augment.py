"""Offline augmentation for dataset versions (v1..v5): augmented copies of training images written to disk.

The split stage calls this to fill classes below the balance floor, and only on training images
(augmenting before splitting is the seed's leakage bug). Training-time augmentation is a different
thing: `research.inputs.loaders.BatchAugment`, on batches on the device. Every output is a pure function
of (parent image, settings, seed): the same seed gives the same pixels and, with the fixed PNG settings
below, the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from research.data.image import WHITE, open_rgb, to_rgb
from research.errors import ConfigError

if TYPE_CHECKING:
    from torchvision.transforms import v2

# torch and torchvision (seconds of imports) load where an image is augmented: `split --help`, a split refused for a
# bad argument or recipe, and a recipe without a floor (v1) never load them
# v2 transforms draw from torch's global RNG, which threads share: seed-and-draw must not interleave.
_RNG_LOCK = threading.Lock()


@dataclasses.dataclass
class OfflineAugment:
    """What one augmented copy may undergo (torchvision.transforms.v2, applied to a PIL image)."""

    hflip: float = 0.5  # probability of a horizontal flip
    rotation: float = 15.0  # degrees, +-; corners filled white
    crop_scale_min: float = 0.7  # RandomResizedCrop scale=(crop_scale_min, 1), back to the parent's size
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 = off

    def validate(self) -> None:
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"augment.hflip={self.hflip} is a probability: use 0..1.")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"augment.crop_scale_min={self.crop_scale_min} must be in (0, 1].")
        for key in ("rotation", "color_jitter"):
            if getattr(self, key) < 0:
                raise ConfigError(f"augment.{key}={getattr(self, key)} must be >= 0 (0 turns it off).")


def build_transform(cfg: OfflineAugment, size: tuple[int, int]) -> v2.Compose:
    """The transform for one image of `size` (width, height); the output keeps that size."""
    from torchvision.transforms import v2

    width, height = size
    steps: list = [v2.RandomHorizontalFlip(p=cfg.hflip)]
    if cfg.rotation > 0:
        steps.append(v2.RandomRotation(cfg.rotation, fill=WHITE))
    if cfg.crop_scale_min < 1.0:
        steps.append(v2.RandomResizedCrop((height, width), scale=(cfg.crop_scale_min, 1.0), antialias=True))
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return v2.Compose(steps)


def augment_image(image: Image.Image, cfg: OfflineAugment, seed: int) -> Image.Image:
    """One augmented RGB copy of `image`; the global torch RNG is left as it was (thread-safe)."""
    import torch

    rgb = to_rgb(image)
    transform = build_transform(cfg, rgb.size)
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(rgb)


def png_bytes(image: Image.Image) -> bytes:
    """PNG bytes with fixed settings and no metadata, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def write_augmented(parent: Path, out: Path, cfg: OfflineAugment, seed: int) -> bytes:
    """Write one augmented copy of the image file `parent` to `out` (PNG); returns its bytes."""
    data = png_bytes(augment_image(open_rgb(parent), cfg, seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return data
