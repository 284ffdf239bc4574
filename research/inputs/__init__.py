"""The training input path: what the trainer reads each step, apart from the dataset stages in research/data.

Two routes, one interface (`loaders.Loaders`):
- images: `decoded` decodes a dataset version once into a uint8 store per split; `loaders` serves batches
  over it (or over the image folders), with the batch augmentation on the GPU/CPU device;
- stored trunk activations: `features` runs the frozen prefix of the model once, stores its output (the
  pooled features, or the activations before the last trainable stages) with K augmented views per
  training image, and serves those.
Which route a run takes is read from `cfg.loader` ("features", or an image loader), never guessed.

The submodules are imported when used, so importing one of them (or this package) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from research.config import TrainConfig
    from research.inputs.loaders import Loaders
    from research.models import Preprocessing


def build(version, model: torch.nn.Module, prep: Preprocessing, cfg: TrainConfig, device: torch.device) -> Loaders:
    """The run's train/val/test batches: stored trunk activations when cfg.loader is "features", else images."""
    if cfg.loader == "features":
        from research.inputs.features import build_feature_loaders

        return build_feature_loaders(version, model, prep, cfg, device)
    from research.inputs.loaders import build_loaders

    return build_loaders(version, cfg, device, prep=prep)
