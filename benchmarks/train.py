"""Training img/s per model: synthetic tensors already on the device vs the real cached loader.

pipeline_efficiency = real / synthetic: the share of the model's own speed that the input path
delivers (1.0 = the data path costs nothing). Both use the same model, optimizer (SGD),
cross-entropy, batch size, autocast and memory format; the real run takes batches from
`build_loaders(...).train.epoch(e)` with the default training augmentation. Synthetic and real
alternate for --repeats rounds and the best round of each counts, so a burst of load from other
processes on a shared machine hurts both alike.

    python -m benchmarks.train                                # CPU defaults: 64 px, a few batches
    python -m benchmarks.train --device cuda --image-size 224 --batch-size 128 --amp --channels-last
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import add_common_arguments, load_dataset, machine_info, resolve_device, sync, write_results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--models", nargs="+", default=["vgg16_v2", "resnet18", "resnet50"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each round")
    parser.add_argument("--repeats", type=int, default=2, help="alternating synthetic/real rounds; best counts")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps)")
    parser.add_argument("--cache-root", default="data/cache")
    return parser.parse_args(argv)


def make_step(model, device, amp: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def timed(step, batches, warmup: int, steps: int, device) -> float:
    """img/s over `steps` steps after `warmup` untimed ones; batches is an iterator of (x, y)."""
    for _ in range(warmup):
        step(*next(batches))
    sync(device)
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        step(x, y)
        images += x.shape[0]
    sync(device)
    return images / (time.perf_counter() - start)


def real_batches(stream):
    """Full cached-loader batches across epochs, endlessly (epoch 0, 1, ... like training).

    An epoch's smaller last batch is skipped: a new shape would re-trigger cudnn autotuning
    inside the timed region, a cost of the benchmark, not of the data path."""
    for epoch in itertools.count():
        for x, y in stream.epoch(epoch):
            if x.shape[0] == stream.cfg.batch_size:
                yield x, y


def measure(name: str, loaders, num_classes: int, args, device, amp: bool, cl: bool) -> dict:
    from research.models import build_model

    torch.manual_seed(0)
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = build_model(name, num_classes, pretrained=False).to(device, memory_format=fmt).train()
    if args.compile:
        model = torch.compile(model)
    step = make_step(model, device, amp)
    b, s = args.batch_size, args.image_size
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (b,), device=device)
    synthetic_batches = itertools.repeat((x, y))
    real = real_batches(loaders.train)
    synth, actual = [], []
    for _ in range(args.repeats):
        synth.append(timed(step, synthetic_batches, args.warmup, args.steps, device))
        actual.append(timed(step, real, args.warmup, args.steps, device))
    real.close()
    row = {"model": name, "synthetic_img_per_s": round(max(synth), 2), "real_img_per_s": round(max(actual), 2),
           "rounds_synthetic": [round(v, 2) for v in synth], "rounds_real": [round(v, 2) for v in actual]}
    row["pipeline_efficiency"] = round(row["real_img_per_s"] / row["synthetic_img_per_s"], 3)
    return row


def main(argv=None) -> int:
    from research.config import TrainConfig
    from research.inputs.loaders import build_loaders

    args = parse_args(argv)
    console = Console()
    device = resolve_device(args.device, args.threads)
    amp = args.amp if args.amp is not None else device.type == "cuda"
    cl = args.channels_last if args.channels_last is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    version, note = load_dataset(args, device, console)
    cfg = TrainConfig(dataset=str(version.dir), image_size=args.image_size, batch_size=args.batch_size,
                      channels_last=cl, loader="cached")
    loaders = build_loaders(version, cfg, device, cache_root=args.cache_root)
    rows = []
    for name in args.models:
        console.print(f"{name}: {args.repeats} x ({args.warmup}+{args.steps} synthetic, "
                      f"{args.warmup}+{args.steps} real) steps ...")
        rows.append(measure(name, loaders, len(loaders.classes), args, device, amp, cl))
    info = machine_info(device)
    t = Table(title=f"training img/s, {args.image_size}px, batch {args.batch_size}, {device}"
                    f"{' bf16' if amp else ''}{' channels_last' if cl else ''} ({note}), load {info['loadavg_1m']}")
    for col in ("model", "synthetic img/s", "real img/s", "pipeline efficiency"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["model"], f"{r['synthetic_img_per_s']:.1f}", f"{r['real_img_per_s']:.1f}",
                  f"{r['pipeline_efficiency']:.2f}")
    console.print(t)
    path = write_results("train", {
        "machine": info, "dataset": note, "image_size": args.image_size, "batch_size": args.batch_size,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "amp_bf16": amp, "channels_last": cl,
        "compile": args.compile, "by_model": {r["model"]: r for r in rows}}, args.out)
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
