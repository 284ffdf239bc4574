"""Fine-tuning recipes for a pretrained trunk, compared fast on a GPU before a CPU study spends an hour.

Each recipe trains with the project's own parts (build_model with ImageNet weights, the cached
loaders with the model's preprocessing, the losses, the optimizer groups with layer decay and the
head's lr scale, a frozen trunk for the first epochs) and prints val/test macro-F1 at the best val
epoch. No MLflow: a device box may not have it. Results: benchmarks/results/transfer-<host>-<date>.json.

    python -m benchmarks.transfer_recipes --dataset v3 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from research import configfile, models
from research.config import TrainConfig
from research.data.versions import load_version
from research.inputs.loaders import build_loaders
from research.losses import build_loss
from research.metrics import classification_metrics
from research.schedules import build_optimizer, build_scheduler, layer_decay_scales, param_groups

BASE = dict(model="efficientnet_lite0", pretrained=True, optimizer="adamw", lr=1e-3, weight_decay=0.05,
            lr_schedule="cosine", warmup_epochs=1, epochs=15, batch_size=64, label_smoothing=0.1,
            layer_decay=0.7, head_lr_scale=10.0, freeze_epochs=1)
RECIPES = {
    "ft224": {},
    "ft224_seed1": {"seed": 1},
    "ft192": {"image_size": 192},
    "ft160": {"image_size": 160},
    "ft128": {"image_size": 128},
    "ft224_no_layer_decay": {"layer_decay": 1.0},
    "ft224_lr3e-4": {"lr": 3e-4},
    "ft224_lr3e-3": {"lr": 3e-3},
    "ft224_v2head": {"head": "v2"},
    "ft224_bsoftmax_sqrt": {"loss": "balanced_softmax", "sampler": "sqrt"},
    "ft224_strong_aug": {"augment": {"crop_scale_min": 0.35, "color_jitter": 0.4, "grayscale": 0.2, "rotation": 15.0}},
    "ft224_30ep": {"epochs": 30},
    "ft160_30ep": {"image_size": 160, "epochs": 30},
    "ft224_no_freeze": {"freeze_epochs": 0},
    # round 2, after round 1 showed that a faster trunk (lr 3e-3, no layer decay) wins at 224 px
    "fast": {"lr": 3e-3, "layer_decay": 1.0},
    "fast_seed1": {"lr": 3e-3, "layer_decay": 1.0, "seed": 1},
    "fast_10ep": {"lr": 3e-3, "layer_decay": 1.0, "epochs": 10},
    "fast_8ep": {"lr": 3e-3, "layer_decay": 1.0, "epochs": 8},
    "fast_lr1e-2": {"lr": 1e-2, "layer_decay": 1.0},
    "fast_head1x": {"lr": 3e-3, "layer_decay": 1.0, "head_lr_scale": 1.0},
    "fast_ld0.85": {"lr": 3e-3, "layer_decay": 0.85},
    "fast_v2head_head1x": {"lr": 3e-3, "layer_decay": 1.0, "head": "v2", "head_lr_scale": 1.0},
    "fast_bsoftmax": {"lr": 3e-3, "layer_decay": 1.0, "loss": "balanced_softmax"},
    "fast_192_10ep": {"lr": 3e-3, "layer_decay": 1.0, "image_size": 192, "epochs": 10},
}
ROUNDS = {"1": [k for k in RECIPES if not k.startswith("fast")], "2": [k for k in RECIPES if k.startswith("fast")]}


def evaluate(model, batches, amp, device, n_classes):
    model.eval()
    ys, ps = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for x, y in batches:
            ps.append(model(x).float().argmax(1).cpu())
            ys.append(y.cpu())
    return classification_metrics(torch.cat(ys).numpy(), torch.cat(ps).numpy(), n_classes)


def run(cfg: TrainConfig, device: torch.device) -> dict:
    torch.manual_seed(cfg.seed)
    version = load_version(cfg.dataset, cfg.data_root)
    model = models.build_model(cfg.model, len(version.classes), cfg.pretrained, cfg.dropout, cfg.head)
    prep = models.preprocessing(model, cfg.image_size)
    cfg = dataclasses.replace(cfg, image_size=prep.image_size)
    model = model.to(device).to(memory_format=torch.channels_last)
    data = build_loaders(version, cfg, device, prep=prep)
    trunk, head = models.trunk_and_head(model)
    scales = layer_decay_scales(trunk, cfg.layer_decay) if cfg.layer_decay < 1 else {}
    for p in head.parameters():
        scales[id(p)] = cfg.head_lr_scale
    opt = build_optimizer(cfg.optimizer, param_groups(model.parameters(), cfg.lr, cfg.weight_decay, scales), cfg.lr)
    sched = build_scheduler(cfg.lr_schedule, opt, epochs=cfg.epochs, steps_per_epoch=len(data.train), base_lr=cfg.lr,
                            warmup_epochs=cfg.warmup_epochs)
    counts = np.bincount(data.train_labels, minlength=len(data.classes)).tolist()
    criterion = build_loss(cfg, counts)
    amp = device.type == "cuda"
    best, t0 = {"val": -1.0}, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        models.set_trunk_frozen(model, epoch <= cfg.freeze_epochs)
        models.train_mode(model)
        for x, y in data.train.epoch(epoch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_batch()
        sched.step_epoch()
        val = evaluate(model, data.val, amp, device, len(data.classes))["f1_macro"]
        if val > best["val"]:
            test = evaluate(model, data.test, amp, device, len(data.classes))
            best = {"val": val, "test": test["f1_macro"], "test_accuracy": test["accuracy"], "epoch": epoch}
    return best | {"seconds": time.perf_counter() - t0, "image_size": prep.image_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="v3")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--round", choices=list(ROUNDS),
                    help="the recipes of one round (1: broad, 2: around round 1's best)")
    ap.add_argument("--epochs", type=int, help="override every recipe's epochs (a quick CPU check)")
    args = ap.parse_args()
    device = torch.device(args.device)
    results = {}
    for name in ROUNDS[args.round] if args.round else args.recipes:
        changes = BASE | {"dataset": args.dataset, "device": args.device} | RECIPES[name]
        if args.epochs:
            changes["epochs"] = args.epochs
        cfg = configfile.from_dict(TrainConfig, changes)
        results[name] = run(cfg, device) | {"changes": RECIPES[name]}
        r = results[name]
        print(f"{name:24s} {r['image_size']:>3}px  val {r['val']:.3f}  test {r['test']:.3f}"
              f" (acc {r['test_accuracy']:.3f})  best epoch {r['epoch']:>2}  {r['seconds']:.0f}s", flush=True)
    out = Path("benchmarks/results") / f"transfer-{platform.node()}-{datetime.now():%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": BASE, "device": str(device), "torch": torch.__version__,
                               "results": results}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
