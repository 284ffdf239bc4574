"""VGG16_v2 training steps below 128 px: the folded head (what the model runs) vs the pooled one.

The seed's head pools the trunk's map to 7x7 and flattens 25,088 features; at 32 px the map is
1x1, so the pool copies it 49 times. `VGGv2.forward` folds the pool into the first Linear
(`research.models.folded_first_linear`): same outputs and gradients, fewer multiply-adds. Both
paths below run the same model, batch, SGD step and autocast; rounds alternate and the best
round of each counts, so load from other processes hurts both alike. Quote the ratio.

    python -m benchmarks.vgg_head                                # CPU: vgg16_bn_v2, 32 and 64 px
    python -m benchmarks.vgg_head --device cuda --batch-size 128 --amp
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import machine_info, resolve_device, sync, write_results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vgg_head", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16_bn_v2", choices=["vgg16_v2", "vgg16_bn_v2"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best counts")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<host>-<date>.json)")
    return parser.parse_args(argv)


def pooled(model, x):
    """The seed's head as written: pool to 7x7, flatten 25,088 features, the Linear stack."""
    return model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))


def images_per_second(model, forward, x, y, optimizer, steps: int, amp: bool, device) -> float:
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(forward(model, x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * x.shape[0] / (time.perf_counter() - start)


def main(argv=None) -> int:
    from research.models import build_model

    args = parse_args(argv)
    device = resolve_device(args.device, args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, 20).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)  # small: weights stay sane across rounds
    paths = {"pooled": pooled, "folded": lambda m, x: m(x)}
    rows = []
    for size in args.sizes:
        x = torch.randn(args.batch_size, 3, size, size, device=device)
        y = torch.randint(0, 20, (args.batch_size,), device=device)
        best = {name: 0.0 for name in paths}
        for _ in range(args.repeats):
            for name, forward in paths.items():
                best[name] = max(best[name], images_per_second(model, forward, x, y, optimizer, args.steps,
                                                               args.amp, device))
        rows.append({"image_size": size, "pooled_img_s": round(best["pooled"], 1),
                     "folded_img_s": round(best["folded"], 1), "speedup": round(best["folded"] / best["pooled"], 2)})
    table = Table(title=f"{args.model} training step, batch {args.batch_size}, amp={args.amp}, {device}")
    for col in ("image px", "pooled img/s", "folded img/s", "speedup"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["image_size"]), str(r["pooled_img_s"]), str(r["folded_img_s"]), f"{r['speedup']}x")
    Console().print(table)
    info = machine_info(device)
    path = write_results("vgg_head", {"machine": info, "model": args.model, "batch_size": args.batch_size,
                                      "amp": args.amp, "rows": rows}, args.out)
    print(f"results: {path} (load average {info['loadavg_1m']} at the end)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
