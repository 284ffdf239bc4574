"""Images/s of the training input paths, one run, same images: folder vs cached, per image size.

folder: ImageFolder + PIL decode/resize + per-image torchvision.transforms.v2 in a DataLoader with
one worker per available core (the seed's pipeline). cached: batches gathered from the uint8
memmap and augmented as a batch on the device (research/inputs/loaders.py). Both run the default
training augmentation and end with normalised float batches on the device.

The cache is built outside the timed region (its build time is reported on its own), in a
temporary cache root unless --cache-root is given. Each path gets a warm-up (workers started,
first batches), then --epochs timed epochs.

    python -m benchmarks.loader                       # 224 and 64 px, CPU or the GPU if present
    python -m benchmarks.loader --sizes 224 --batch-size 128 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time

from rich.console import Console
from rich.table import Table

from benchmarks import add_common_arguments, cores, load_dataset, machine_info, resolve_device, sync, write_results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per path")
    parser.add_argument("--warmup-batches", type=int, default=None, help="default: 2 per folder worker, at least 4")
    parser.add_argument("--workers", type=int, default=None,
                        help="folder DataLoader workers (default: cores available)")
    parser.add_argument("--cache-root", default=None, help="keep caches here (default: a temp dir, removed after)")
    return parser.parse_args(argv)


def time_stream(stream, warmup: int, epochs: int, device) -> dict:
    """Warm up on epoch 0, then time full epochs 1..epochs; img/s over the timed images."""
    it = stream.epoch(0)
    for i, _ in enumerate(it):
        if i + 1 >= warmup:
            break
    it.close()  # stop the warm-up epoch (and its prefetch thread) early
    sync(device)
    images, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for x, _ in stream.epoch(epoch):
            images += x.shape[0]
    sync(device)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": round(seconds, 3), "img_per_s": round(images / seconds, 1)}


def measure(version, size: int, args, device, cache_root, console) -> dict:
    from research.config import TrainConfig
    from research.inputs import decoded
    from research.inputs.loaders import build_loaders

    workers = args.workers if args.workers is not None else cores()
    warmup = args.warmup_batches or max(4, 2 * workers)
    base = TrainConfig(dataset=str(version.dir), image_size=size, batch_size=args.batch_size, seed=0)

    start = time.perf_counter()
    built = decoded.ensure_cache(version, size, cache_root, progress=True)
    build_s = time.perf_counter() - start

    row = {"image_size": size, "batch_size": args.batch_size, "train_images": int(len(built.labels["train"])),
           "cache_build_s": round(build_s, 2), "cache_rebuilt": built.built, "folder_workers": workers}
    folder = build_loaders(version, dataclasses.replace(base, loader="folder", num_workers=workers), device)
    console.print(f"[{size}px] folder path: ImageFolder + PIL + v2 transforms, {workers} workers ...")
    row["folder"] = time_stream(folder.train, warmup, args.epochs, device)
    del folder  # stop its persistent workers before timing the other path
    cached = build_loaders(version, dataclasses.replace(base, loader="cached"), device, cache_root=cache_root)
    console.print(f"[{size}px] cached path: memmap gather + batched augmentation on {device} ...")
    row["cached"] = time_stream(cached.train, 4, args.epochs, device)
    row["speedup"] = round(row["cached"]["img_per_s"] / row["folder"]["img_per_s"], 2)
    return row


def table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("size", "batch", "images", "folder img/s", "cached img/s", "speedup", "cache build s", "workers"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['image_size']}px", str(r["batch_size"]), str(r["train_images"]),
                  f"{r['folder']['img_per_s']:.0f}", f"{r['cached']['img_per_s']:.0f}", f"{r['speedup']:.1f}x",
                  f"{r['cache_build_s']:.1f}", str(r["folder_workers"]))
    return t


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console()
    device = resolve_device(args.device, args.threads)
    version, note = load_dataset(args, device, console)
    tmp = None if args.cache_root else tempfile.mkdtemp(prefix="bench-cache-")
    cache_root = args.cache_root or tmp
    try:
        rows = [measure(version, size, args, device, cache_root, console) for size in args.sizes]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info = machine_info(device)
    console.print(table(rows, f"input path, training augmentation, {device} ({note}), load {info['loadavg_1m']}"))
    path = write_results("loader", {"machine": info, "dataset": note, "epochs": args.epochs,
                                    "by_size": {str(r["image_size"]): r for r in rows}}, args.out)
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
