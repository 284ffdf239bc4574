"""Seconds per training step, float32 against bf16 autocast, one run, same model and batch: does `amp` pay here?

`amp` left unset turns bf16 autocast on only where the device computes bf16 natively (research.train.native_bf16:
CUDA, or a CPU with AVX-512-BF16/AMX). This measures why: a training step (forward, loss, backward, SGD step) of
each model at its size, alternating float32 and autocast for --repeats rounds after a warm-up step of each, so a
busy machine slows both alike; the ratio is what to quote.

    python -m benchmarks.amp_cpu                                  # lite0 at 224 px and resnet18 at 64 px
    python -m benchmarks.amp_cpu --batch-size 32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

from rich.console import Console
from rich.table import Table

from benchmarks import machine_info, resolve_device, write_results

CASES = (("efficientnet_lite0", 224), ("resnet18", 64))


def step_seconds(model, x, y, amp: bool, device) -> float:
    import torch

    t = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            p.data.add_(p.grad, alpha=-1e-3)
            p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main(argv=None) -> int:
    import torch

    from research import models
    from research.train import native_bf16

    parser = argparse.ArgumentParser(prog="python -m benchmarks.amp_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each mode per model")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device, args.threads)
    info = machine_info(device) | {"native_bf16": native_bf16(device)}
    if device.type == "cpu":
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    console = Console()
    console.print(info)
    rows = []
    for name, size in CASES:
        torch.manual_seed(0)
        model = models.build_model(name, 20, pretrained=False).to(device).train()
        x = torch.randn(args.batch_size, 3, size, size, device=device)
        y = torch.randint(0, 20, (args.batch_size,), device=device)
        for amp in (False, True):  # warm-up
            step_seconds(model, x, y, amp, device)
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for amp in (False, True):
                times[amp].append(step_seconds(model, x, y, amp, device))
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"model": name, "image_size": size, "batch_size": args.batch_size, "fp32_s": round(fp32, 3),
                     "bf16_autocast_s": round(bf16, 3), "bf16_over_fp32": round(bf16 / fp32, 2)})
    table = Table(title=f"training step, median of {args.repeats} (s)")
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)
    path = write_results("amp_cpu", {"machine": info, "rows": rows}, args.out)
    console.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
