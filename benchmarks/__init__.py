"""Speed measurements, run by hand (not tests): `python -m benchmarks.loader`, `python -m benchmarks.train`.

Shared pieces: the dataset version to measure on (a real one, or a synthetic version of real
PNG files under /tmp when none is built), the machine description, and the results file
`benchmarks/results/<host>-<date>.json` that both benchmarks merge their section into.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SYNTHETIC_CLASSES = ("bird", "car", "cloud", "cup", "fish", "heart", "house", "tree")


def add_common_arguments(parser) -> None:
    parser.add_argument("--dataset", default="v1", help="version name under --data-root, or a version dir (default v1)")
    parser.add_argument("--data-root", default="data/versions")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--synthetic-images", type=int, default=None,
                        help="training images of the synthetic version built when --dataset is missing "
                             "(default 480 on CPU, 4096 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<host>-<date>.json)")


def resolve_device(name: str, threads: int | None = None):
    import torch

    if threads:
        torch.set_num_threads(threads)

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_info(device) -> dict:
    import torch

    info = {
        "host": socket.gethostname(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cores() -> int:
    return len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------ the version

def _draw(args: tuple[int, int, str]) -> None:
    """One synthetic 'drawing': flat shapes over transparency, a few hundred px, saved as RGBA PNG."""
    from PIL import Image, ImageDraw

    seed, cls_index, path = args
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(160, 420, 2))
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    for _ in range(3 + cls_index % 4):
        box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
        xy = [box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,)
        (draw.ellipse if (cls_index + _) % 2 else draw.rectangle)(xy, fill=colour, outline=(0, 0, 0, 255), width=3)
    im.save(path)


def synthetic_version(n_train: int, root: Path | None = None, seed: int = 0) -> Path:
    """A version dir of real PNG files (ImageFolder layout + manifest.csv + version.json) under /tmp.

    Splits are 60/20/20 of 5/3 * n_train images over 8 classes with a 4x imbalance. Built once
    per (n_train, seed) and reused.
    """
    import pandas as pd

    root = Path(root or os.environ.get("TMPDIR", "/tmp"))
    vdir = root / f"bench-version-{n_train}-{seed}"
    if (vdir / "version.json").is_file():
        return vdir
    rng = np.random.default_rng(seed)
    weights = np.linspace(4, 1, len(SYNTHETIC_CLASSES))
    total = int(n_train / 0.6)
    per_class = np.maximum(5, (weights / weights.sum() * total).astype(int))
    rows, jobs = [], []
    for ci, (cls, n) in enumerate(zip(SYNTHETIC_CLASSES, per_class)):
        splits = ["train"] * int(n * 0.6) + ["val"] * int(n * 0.2)
        splits += ["test"] * (n - len(splits))
        for i, split in enumerate(splits):
            rel = f"{split}/{cls}/{cls}_{i:05d}.png"
            (vdir / split / cls).mkdir(parents=True, exist_ok=True)
            jobs.append((int(rng.integers(2**31)), ci, str(vdir / rel)))
            rows.append({"path": rel, "class": cls, "split": split, "group": f"{cls}-{i}",
                         "source_path": rel, "augmented_from": ""})
    with ProcessPoolExecutor(max_workers=cores()) as pool:
        list(pool.map(_draw, jobs, chunksize=32))
    for row in rows:
        row["sha256"] = hashlib.sha256((vdir / row["path"]).read_bytes()).hexdigest()
    frame = pd.DataFrame(rows)[["path", "class", "split", "group", "sha256", "source_path", "augmented_from"]]
    frame.to_csv(vdir / "manifest.csv", index=False)
    digest = hashlib.sha256("".join(sorted(r["path"] + r["sha256"] for r in rows)).encode()).hexdigest()
    counts = frame.groupby(["split", "class"]).size()
    (vdir / "version.json").write_text(json.dumps({
        "name": vdir.name, "recipe": "benchmark-synthetic", "seed": seed, "classes": sorted(SYNTHETIC_CLASSES),
        "counts": {s: {c: int(n) for c, n in counts[s].items()} for s in ("train", "val", "test")},
        "source_digest": digest, "digest": digest, "image_mode": "RGBA"}, indent=1))
    return vdir


def load_dataset(args, device, console) -> tuple[object, str]:
    """(Version, note): the named version, or a synthetic one when it is not built (said aloud)."""
    from research.data.versions import load_version
    from research.errors import ConfigError

    try:
        return load_version(args.dataset, args.data_root), f"version {args.dataset}"
    except ConfigError:
        n = args.synthetic_images or (4096 if device.type == "cuda" else 480)
        console.print(f"[yellow]Dataset version {args.dataset!r} is not built under {args.data_root}: "
                      f"measuring on a synthetic version of {n} real PNG training images under /tmp instead.")
        vdir = synthetic_version(n)
        return load_version(vdir), f"synthetic ({vdir})"


# ------------------------------------------------------------------------------ results

def results_path(out: str | None) -> Path:
    if out:
        return Path(out)
    return RESULTS / f"{socket.gethostname()}-{_dt.date.today().isoformat()}.json"


def write_results(section: str, payload: dict, out: str | None = None) -> Path:
    """Merge `{section: payload}` into the results file (atomic replace)."""
    path = results_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[section] = payload
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
