"""Training and evaluation batches for the trainer: the cached path (default) and the folder path.

`build_loaders(version, cfg, device)` returns `Loaders`; both paths give the same interface,
the same index order (`decoded.split_items`), the same decode rule (`decoded.load_rgb`, with the
model's interpolation), the same normalisation (the model's mean/std) and the
same epoch index sequence (`samplers.epoch_indices` with a generator seeded from
(cfg.seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would).

cached: uint8 rows gathered from the memmap of `decoded.ensure_cache`, pinned and copied to the
device (non_blocking), augmented there as one batch with per-sample random parameters
(`BatchAugment`: one affine grid_sample does crop + flip + rotation, colour jitter and
grayscale are per-sample tensor ops), normalised, all in a background thread that prefetches
the next batches while the model computes.

folder: torchvision ImageFolder over `<version>/<split>` + per-image torchvision.transforms.v2
in DataLoader workers, the seed's pipeline, kept for comparison (`loader=folder`).

Both: a last batch of exactly one image is dropped (BatchNorm cannot normalise one sample in
training mode); larger remainders are kept. MixUp/CutMix (cfg.augment.mixup / cutmix > 0) run
on the device batch (torchvision.transforms.v2's definitions, drawn per batch from its seed) and turn y into soft
targets [B, C].
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from research.config import AugmentConfig, TrainConfig
from research.data.image import IMAGENET_MEAN, IMAGENET_STD, SPLITS
from research.errors import ConfigError
from research.inputs import decoded

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratio range
PREFETCH = 3  # batches ready ahead of the model


class Batch(tuple):
    """A training batch: the (x, y) pair it always was (it unpacks as one), and `extras` beside it: named values
    with one row per image. A stream says there how the batch's view was made (`index`: rows of the split; with
    `augment`: the BatchAugment parameters and `mix_seed`; with `view`: the stored view per image), so a route
    layer can add what belongs to the same view (research/inputs/teacher.py: the teacher's logits)."""

    extras: dict[str, Any]

    def __new__(cls, x: torch.Tensor, y: torch.Tensor, extras: dict[str, Any] | None = None) -> Batch:
        batch = super().__new__(cls, (x, y))
        batch.extras = dict(extras or {})
        return batch

    @property
    def x(self) -> torch.Tensor:
        return self[0]

    @property
    def y(self) -> torch.Tensor:
        return self[1]


@dataclasses.dataclass
class Loaders:
    train: TrainStream  # len(train) = batches per epoch; train.epoch(epoch) -> Iterator[Batch], each an (x, y)
    val: Iterable  # deterministic, no augmentation; (x, y) with y LongTensor
    test: Iterable
    classes: list[str]
    train_labels: np.ndarray  # class index per training image


# ---------------------------------------------------------------------------------- epoch plan

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends on (seed, epoch) and nothing else."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch: a trailing batch of size 1 is dropped (BatchNorm), bigger ones kept."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 else 0)


@dataclasses.dataclass
class EpochPlan:
    batches: list[torch.Tensor]  # image indices per batch
    batch_seeds: list[int]  # per batch: seeds its augmentation and MixUp/CutMix draws


def epoch_plan(labels: np.ndarray, cfg: TrainConfig, epoch: int) -> EpochPlan:
    from research import samplers

    g = epoch_generator(cfg.seed, epoch)
    order = samplers.epoch_indices(labels, cfg.sampler, epoch, g, drs_epoch=cfg.drs_epoch)
    batches = list(torch.split(order, cfg.batch_size))
    if batches and len(batches[-1]) == 1:
        batches.pop()
    seeds = torch.randint(0, 2**62, (len(batches),), generator=g).tolist()
    return EpochPlan(batches, seeds)


# ---------------------------------------------------------------------------------- batch ops

def resolve_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"


class Normalize:
    """uint8 or 0..255 float [B,3,H,W] -> (x / 255 - mean) / std in float32, in one addcmul pass."""

    def __init__(self, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


PAPER_WHITE = 235.0  # a pixel whose every channel is above this is the paper (the decode rule puts alpha on white)


def rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by its angle (radians) in YIQ space: luma kept, the chroma plane turned."""
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           device=x.device)
    yiq2rgb = torch.linalg.inv(rgb2yiq)
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    turn = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                        torch.stack([zero, sin, cos], 1)], 1)  # [n, 3, 3]
    m = yiq2rgb @ turn @ rgb2yiq
    return torch.einsum("nij,njhw->nihw", m, x).clamp_(0, 255)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


class BatchAugment:
    """The training augmentations of AugmentConfig on a uint8 batch, with per-sample parameters.

    torchvision.transforms.v2 on a batched tensor draws one set of parameters for the whole
    batch; here every sample draws its own, with torchvision's definitions:
    RandomResizedCrop(S, scale=(crop_scale_min, 1), ratio=(3/4, 4/3)) (10 tries, then the
    centre-crop fallback), RandomHorizontalFlip(hflip), RandomRotation(rotation),
    ColorJitter(brightness=contrast=saturation=color_jitter) in the fixed order brightness,
    contrast, saturation (torchvision shuffles the order), RandomGrayscale(grayscale).

    Crop, flip and rotation compose into one affine matrix per sample and run as a single
    bilinear `grid_sample`: the crop is a sub-box of the S x S cached image resized back to S,
    so it only magnifies and bilinear needs no antialias. A rotation samples the surrounding image
    where the source has pixels and white (the decode rule's paper) beyond its edge. Work is in float
    0..255; the last step is the fused normalisation.
    """

    def __init__(self, aug: AugmentConfig, size: int, device: torch.device, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD) -> None:
        self.aug = aug
        self.size = size
        self.normalize = Normalize(device, mean, std)

    def params(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        a, s = self.aug, self.size
        tries = 10
        area = s * s * torch.empty(n, tries).uniform_(a.crop_scale_min, 1.0, generator=g)
        log_r = torch.empty(n, tries).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=g)
        ratio = torch.exp(log_r)
        w = torch.sqrt(area * ratio).round()
        h = torch.sqrt(area / ratio).round()
        ok = (w > 0) & (w <= s) & (h > 0) & (h <= s)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        pick = first.clamp(min=0).unsqueeze(1)
        w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.full((n,), float(s)))
        h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.full((n,), float(s)))
        top = torch.floor(torch.rand(n, generator=g) * (s - h + 1))
        left = torch.floor(torch.rand(n, generator=g) * (s - w + 1))
        flip = torch.rand(n, generator=g) < a.hflip
        angle = torch.empty(n).uniform_(-a.rotation, a.rotation, generator=g) if a.rotation > 0 else torch.zeros(n)
        lo = max(0.0, 1.0 - a.color_jitter)
        jitter = torch.empty(n, 3).uniform_(lo, 1.0 + a.color_jitter, generator=g)  # brightness, contrast, saturation
        gray = torch.rand(n, generator=g) < a.grayscale
        p = {"top": top, "left": left, "h": h, "w": w, "flip": flip, "angle": angle, "jitter": jitter, "gray": gray}
        return p | self.style_params(n, g)

    def style_params(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Drawn after the others, and only for the style augmentations that are on: a config without them
        draws the same numbers as before they existed."""
        a, p = self.aug, {}
        if a.hue > 0:
            p["hue"] = torch.empty(n).uniform_(-math.pi * a.hue, math.pi * a.hue, generator=g)
        if a.line_weight > 0:  # -1 thinner, +1 thicker, 0 as drawn
            r = torch.rand(n, generator=g)
            p["line"] = torch.where(r < a.line_weight / 2, 1, torch.where(r < a.line_weight, -1, 0))
        if a.background > 0:
            p["paper"] = torch.where((torch.rand(n, generator=g) < a.background).view(n, 1),
                                     torch.rand(n, 3, generator=g) * 255, torch.full((n, 3), -1.0))
        return p

    def theta(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Affine [n, 2, 3] from output coords to source coords (normalised, align_corners=False)."""
        s = float(self.size)
        sx = p["w"] / s * torch.where(p["flip"], -1.0, 1.0)
        sy = p["h"] / s
        tx = (2 * p["left"] + p["w"]) / s - 1
        ty = (2 * p["top"] + p["h"]) / s - 1
        rad = torch.deg2rad(p["angle"])
        cos, sin = torch.cos(rad), torch.sin(rad)
        # source = diag(sx, sy) @ R @ out + t: rotation in output space, then the crop's stretch
        return torch.stack([
            torch.stack([sx * cos, -sx * sin, tx], 1),
            torch.stack([sy * sin, sy * cos, ty], 1),
        ], 1)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 [n, 3, S, S] on the device -> augmented, normalised float32 (params drawn from g)."""
        return self.apply(x, self.params(x.shape[0], g))

    def grid(self, theta: torch.Tensor) -> torch.Tensor:
        """F.affine_grid(theta, align_corners=False) built by broadcasting (3x faster on CPU than
        its batched matmul): grid[b, i, j] = theta[b] @ (u_j, u_i, 1)."""
        n, s = theta.shape[0], self.size
        u = (torch.arange(s, device=theta.device, dtype=torch.float32) * 2 + 1) / s - 1
        g = torch.empty(n, s, s, 2, device=theta.device)
        for k in range(2):
            along_j = theta[:, k, 0, None] * u  # [n, s]
            along_i = theta[:, k, 1, None] * u + theta[:, k, 2, None]
            g[..., k] = along_j[:, None, :] + along_i[:, :, None]
        return g

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        dev = x.device
        xf = x.float()
        grid = self.grid(self.theta(p).to(dev))
        if self.aug.rotation > 0:  # out-of-image samples are white: sample (x - 255) with zero padding
            xf = F.grid_sample(xf.sub_(255.0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            xf.add_(255.0)
        else:
            xf = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
        xf = self.apply_style(xf, p)
        if self.aug.color_jitter > 0:  # torchvision's adjust_* on floats: blend, then clamp to range
            b, c, sat = (p["jitter"][:, i].to(dev).view(n, 1, 1, 1) for i in range(3))
            xf.mul_(b).clamp_(0, 255)
            w = torch.tensor(GRAY_WEIGHTS, device=dev).view(1, 3, 1, 1)
            mean = (xf.mean((2, 3), keepdim=True) * w).sum(1, keepdim=True)  # mean of the grayscale image
            xf = torch.lerp(mean, xf, c).clamp_(0, 255)  # c * x + (1 - c) * mean
            xf = torch.lerp(_gray(xf), xf, sat).clamp_(0, 255)
        if "hue" in p:
            xf = rotate_hue(xf, p["hue"].to(dev))
        if self.aug.grayscale > 0:
            mask = p["gray"].to(dev).view(n, 1, 1, 1)
            xf = torch.where(mask, _gray(xf).expand_as(xf), xf)
        return self.normalize(xf)

    @staticmethod
    def apply_style(xf: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pen and paper on float 0..255 [n, 3, S, S]: line weight (a 3x3 min filter darkens, so thickens, dark
        strokes on light paper; a max filter thins them), then a paper colour where the image is near white."""
        n, dev = xf.shape[0], xf.device
        if "line" in p:
            line = p["line"].to(dev).view(n, 1, 1, 1)
            thick = -F.max_pool2d(-xf, 3, stride=1, padding=1)
            thin = F.max_pool2d(xf, 3, stride=1, padding=1)
            xf = torch.where(line > 0, thick, torch.where(line < 0, thin, xf))
        if "paper" in p:
            paper = p["paper"].to(dev).view(n, 3, 1, 1)
            white = (xf.amin(1, keepdim=True) > PAPER_WHITE) & (paper[:, :1] >= 0)
            xf = torch.where(white, paper.expand_as(xf), xf)
        return xf


class BatchMix:
    """MixUp / CutMix as torchvision.transforms.v2 defines them (one of the two per batch when both are on), drawn
    from a generator seeded per batch. Not from torch's global generator: the prefetch thread that mixes shares it
    with the training thread (dropout), so draws there could interleave; with a generator of its own, a batch's mix
    depends on its seed alone, and a teacher replaying it (research/inputs/teacher.py) draws the same numbers."""

    def __init__(self, aug: AugmentConfig, num_classes: int) -> None:
        self.ops = [(kind, alpha) for kind, alpha in (("mixup", aug.mixup), ("cutmix", aug.cutmix)) if alpha > 0]
        self.num_classes = num_classes

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W], y [B] class indices -> the mixed batch and its soft targets [B, num_classes]."""
        rng = np.random.default_rng(seed)
        kind, alpha = self.ops[int(rng.integers(len(self.ops)))] if len(self.ops) > 1 else self.ops[0]
        lam = float(rng.beta(alpha, alpha))
        if kind == "mixup":
            x = x.roll(1, 0).mul_(1.0 - lam).add_(x.mul(lam))
        else:  # a box of the rolled batch pasted in, its area deciding the label weights
            h, w = x.shape[-2:]
            cx, cy, r = int(rng.integers(w)), int(rng.integers(h)), 0.5 * math.sqrt(1.0 - lam)
            x1, x2 = max(cx - int(r * w), 0), min(cx + int(r * w), w)
            y1, y2 = max(cy - int(r * h), 0), min(cy + int(r * h), h)
            x = x.clone()
            x[..., y1:y2, x1:x2] = x.roll(1, 0)[..., y1:y2, x1:x2]
            lam = 1.0 - (x2 - x1) * (y2 - y1) / (w * h)
        target = F.one_hot(y, self.num_classes).float()
        return x, target.roll(1, 0).mul_(1.0 - lam).add_(target.mul(lam))


# ---------------------------------------------------------------------------------- prefetch

def prefetch(items: Iterable, make: Callable, depth: int = PREFETCH) -> Iterator:
    """Yield make(item) for each item, computed `depth` ahead in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in items:
                out = make(item)
                while not stop.is_set():
                    try:
                        q.put(out, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)

    thread = threading.Thread(target=worker, daemon=True, name="batch-prefetch")
    thread.start()
    try:
        while True:
            out = q.get()
            if out is done:
                return
            if isinstance(out, BaseException):
                raise out
            yield out
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


# ---------------------------------------------------------------------------------- cached path

class CachedBatches:
    """Turns index tensors into device batches from one split's uint8 memmap."""

    def __init__(self, array: np.ndarray, labels: np.ndarray, device: torch.device, channels_last: bool) -> None:
        self.array = array
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.device = device
        self.pin = device.type == "cuda"
        self.format = torch.channels_last if channels_last else torch.contiguous_format

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [n, 3, S, S] (NHWC storage, so channels_last strides) and labels, on the device."""
        rows = idx.numpy()
        if self.pin:  # gather straight into page-locked memory, then an async copy
            buf = torch.empty((len(rows), *self.array.shape[1:]), dtype=torch.uint8, pin_memory=True)
            np.take(self.array, rows, axis=0, out=buf.numpy(), mode="clip")
        else:
            buf = torch.from_numpy(np.take(self.array, rows, axis=0))
        x = buf.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        y = self.labels[idx].to(self.device, non_blocking=True)
        return x, y

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.format)


class CachedTrainStream:
    def __init__(self, batches: CachedBatches, labels: np.ndarray, cfg: TrainConfig, augment: BatchAugment,
                 mix: BatchMix) -> None:
        self.batches, self.labels, self.cfg, self.augment, self.mix = batches, labels, cfg, augment, mix

    def __len__(self) -> int:
        return num_batches(len(self.labels), self.cfg.batch_size)

    def _make(self, item: tuple[torch.Tensor, int]) -> Batch:
        idx, seed = item
        x, y = self.batches.gather(idx)
        params = self.augment.params(x.shape[0], torch.Generator().manual_seed(seed))  # what self.augment(x, g) does
        x = self.augment.apply(x, params)
        if self.mix:
            x, y = self.mix(x, y, seed)
        return Batch(self.batches.finish(x), y, {"index": idx, "augment": params, "mix_seed": seed})

    def epoch(self, epoch: int) -> Iterator[Batch]:
        plan = epoch_plan(self.labels, self.cfg, epoch)
        return prefetch(zip(plan.batches, plan.batch_seeds), self._make)


class CachedEvalBatches:
    """Re-iterable, in cache order, no augmentation."""

    def __init__(self, batches: CachedBatches, n: int, batch_size: int, device: torch.device, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD) -> None:
        self.batches, self.n, self.batch_size = batches, n, batch_size
        self.normalize = Normalize(device, mean, std)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _make(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.gather(idx)
        return self.batches.finish(self.normalize(x)), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return prefetch(torch.arange(self.n).split(self.batch_size), self._make)


def build_cached(version, cfg: TrainConfig, device: torch.device, cache_root, prep, progress: bool = True) -> Loaders:
    cache = decoded.ensure_cache(version, prep.image_size, cache_root, progress=progress,
                                   interpolation=prep.interpolation)
    cl = resolve_channels_last(cfg, device)
    split = {s: CachedBatches(cache.arrays[s], cache.labels[s], device, cl) for s in SPLITS}
    mix = BatchMix(cfg.augment, len(version.classes))
    train = CachedTrainStream(split["train"], cache.labels["train"], cfg,
                              BatchAugment(cfg.augment, prep.image_size, device, prep.mean, prep.std), mix)
    val = CachedEvalBatches(split["val"], len(cache.labels["val"]), cfg.batch_size, device, prep.mean, prep.std)
    test = CachedEvalBatches(split["test"], len(cache.labels["test"]), cfg.batch_size, device, prep.mean, prep.std)
    return Loaders(train, val, test, list(version.classes), cache.labels["train"])


# ---------------------------------------------------------------------------------- folder path

def folder_transforms(aug: AugmentConfig | None, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Per-image torchvision.transforms.v2 after `decoded.load_rgb`; None aug = evaluation."""
    from torchvision.transforms import v2

    style = [k for k in ("hue", "line_weight", "background") if aug is not None and getattr(aug, k) > 0]
    if style:
        raise ConfigError(f"augment.{style[0]}={getattr(aug, style[0])} runs on batches (loader=cached or "
                          "features); loader=folder has no such transform: set it to 0 or change the loader.")
    ops = [v2.ToImage()]
    if aug is not None:
        ops += [v2.RandomResizedCrop(size, scale=(aug.crop_scale_min, 1.0), ratio=CROP_RATIO, antialias=True),
                v2.RandomHorizontalFlip(aug.hflip)]
        if aug.rotation > 0:
            ops.append(v2.RandomRotation(aug.rotation, fill=255))  # white, the decode rule's paper
        if aug.color_jitter > 0:
            cj = aug.color_jitter
            ops.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
        if aug.grayscale > 0:
            ops.append(v2.RandomGrayscale(aug.grayscale))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def folder_dataset(version, split: str, size: int, transform, interpolation: str = "bicubic"):
    """ImageFolder over `<version dir>/<split>` with version.classes as the class order.

    Samples are put in `decoded.split_items` order and checked against the manifest, so index i
    is the same image as row i of the cache.
    """
    from torchvision.datasets import ImageFolder

    classes = list(version.classes)

    class VersionFolder(ImageFolder):
        def find_classes(self, directory):
            return classes, {c: i for i, c in enumerate(classes)}

    root = Path(version.dir) / split
    paths, labels = decoded.split_items(version, split)
    if not root.is_dir():
        if paths:
            raise ConfigError(f"{root} is missing but the manifest lists {len(paths)} {split} images; "
                              "rebuild the version with `python -m research split ...`.")
        root.mkdir(parents=True, exist_ok=True)  # never happens for a built version; keeps ImageFolder quiet
    ds = VersionFolder(str(root), loader=partial(decoded.load_rgb, size=size, interpolation=interpolation),
                       transform=transform, allow_empty=True)
    order = {str(p): i for i, p in enumerate(paths)}
    missing = [p for p, _ in ds.samples if p not in order]
    if missing or len(ds.samples) != len(paths):
        raise ConfigError(
            f"{root} holds {len(ds.samples)} images but manifest.csv lists {len(paths)} for {split} "
            f"(e.g. not in the manifest: {missing[:3]}); the version folder was edited: rebuild it with "
            "`python -m research split ...`."
        )
    ds.samples.sort(key=lambda s: order[s[0]])
    ds.imgs = ds.samples
    ds.targets = [t for _, t in ds.samples]
    if ds.targets != labels.tolist():
        raise ConfigError(f"{root}: folder classes disagree with manifest.csv; rebuild the version.")
    return ds


class _Seeded(torch.utils.data.Dataset):
    """dataset[(index, seed)]: the per-image random transforms draw from `seed` alone, so an epoch
    is the same whatever num_workers is and whatever else used torch's global RNG."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        idx, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[idx]


class _EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, per-image seed) for the epoch set by set_epoch (indices from epoch_plan)."""

    def __init__(self, labels: np.ndarray, cfg: TrainConfig) -> None:
        self.labels, self.cfg, self.plan = labels, cfg, None

    def set_epoch(self, epoch: int) -> None:
        self.plan = epoch_plan(self.labels, self.cfg, epoch)

    def __len__(self) -> int:
        return num_batches(len(self.labels), self.cfg.batch_size)

    def __iter__(self):
        for idx, seed in zip(self.plan.batches, self.plan.batch_seeds):
            seeds = torch.randint(0, 2**62, (len(idx),), generator=torch.Generator().manual_seed(seed)).tolist()
            yield list(zip(idx.tolist(), seeds))


def _loader_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    kw = {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda"}
    if cfg.num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return kw


class FolderTrainStream:
    def __init__(self, dataset, labels: np.ndarray, cfg: TrainConfig, device: torch.device, mix: BatchMix) -> None:
        self.labels, self.cfg, self.device, self.mix = labels, cfg, device, mix
        self.format = torch.channels_last if resolve_channels_last(cfg, device) else torch.contiguous_format
        self.sampler = _EpochBatchSampler(labels, cfg)
        self.loader = torch.utils.data.DataLoader(_Seeded(dataset), batch_sampler=self.sampler,
                                                  **_loader_kwargs(cfg, device))

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Per-image torchvision transforms draw their own parameters, so a batch says only which rows it holds."""
        self.sampler.set_epoch(epoch)
        plan = self.sampler.plan
        for (x, y), seed, idx in zip(self.loader, plan.batch_seeds, plan.batches):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.mix:
                x, y = self.mix(x, y, seed)
            yield Batch(x.contiguous(memory_format=self.format), y, {"index": idx})


class FolderEvalBatches:
    def __init__(self, dataset, cfg: TrainConfig, device: torch.device) -> None:
        self.device = device
        self.format = torch.channels_last if resolve_channels_last(cfg, device) else torch.contiguous_format
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False,
                                                  **_loader_kwargs(cfg, device))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield (x.to(self.device, non_blocking=True).contiguous(memory_format=self.format),
                   y.to(self.device, non_blocking=True))


def build_folder(version, cfg: TrainConfig, device: torch.device, prep) -> Loaders:
    size, interp = prep.image_size, prep.interpolation

    def dataset(split: str, aug: AugmentConfig | None):
        return folder_dataset(version, split, size, folder_transforms(aug, size, prep.mean, prep.std), interp)

    train_ds = dataset("train", cfg.augment)
    labels = np.asarray(train_ds.targets, dtype=np.int64)
    mix = BatchMix(cfg.augment, len(version.classes))
    train = FolderTrainStream(train_ds, labels, cfg, device, mix)
    val = FolderEvalBatches(dataset("val", None), cfg, device)
    test = FolderEvalBatches(dataset("test", None), cfg, device)
    return Loaders(train, val, test, list(version.classes), labels)


# ---------------------------------------------------------------------------------- entry point

TrainStream = CachedTrainStream | FolderTrainStream


def build_loaders(version, cfg: TrainConfig, device: torch.device, cache_root="data/cache", prep=None) -> Loaders:
    """Loaders for `version` (a Version, or a name / directory for load_version) under cfg.loader.

    `prep` (research.models.Preprocessing) is the model's; None: cfg.image_size, ImageNet mean/std, bicubic.
    """
    if prep is None:
        from research.models import Preprocessing

        prep = Preprocessing(cfg.image_size or 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    if isinstance(version, (str, Path)):
        from research.data.versions import load_version

        version = load_version(version, cfg.data_root)
    device = torch.device(device)
    if cfg.loader == "cached":
        return build_cached(version, cfg, device, cache_root, prep)
    if cfg.loader == "folder":
        return build_folder(version, cfg, device, prep)
    raise ConfigError(f"loader={cfg.loader!r}: build_loaders makes image batches (cached or folder); "
                      "loader=features is research.inputs.features.build_feature_loaders.")
