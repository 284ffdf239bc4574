"""Artifact bytes of a study: what `sweep` + `promote` leave in the MLflow store, by one checkout's code.

Runs a small study (default: 20 vgg16_v2 trials at 32 px, one epoch each, no pruning) in a fresh store
under a temp folder, promotes its best trial, and counts what the store holds: all artifact bytes,
and the weight files among them (`model.pth` of each logged model, `best.pt` copies of older code).
`--code DIR` runs another checkout's `research` (e.g. `git worktree add /tmp/before <commit>`) on the
same spec, for a before/after pair in one command. The projection multiplies the weight copies by the
size of the same model's state dict (built here without weights; vgg16_v2's weights do not depend on the
image size: its head folds the pooling into the first Linear).

    python -m benchmarks.artifact_bytes                                  # this checkout, keep_top_k 3
    python -m benchmarks.artifact_bytes --code /tmp/before --keep-top-k none   # older code: no keep rule
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import RESULTS
from research.artifacts import human

REPO = Path(__file__).resolve().parent.parent
WEIGHT_FILES = ("model.pth", "best.pt")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.artifact_bytes", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="data/versions/v3", help="a dataset version dir (make demo builds v3)")
    parser.add_argument("--model", default="vgg16_v2")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--keep-top-k", default="3", help="the spec's keep_top_k; `none` leaves it out (older code)")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose `research` runs (default: this)")
    parser.add_argument("--project", type=int, default=100, help="trials of the projected 224 px study")
    parser.add_argument("--out", type=Path, default=None, help="append the result to this JSON file")
    return parser.parse_args(argv)


def spec(args, checkpoints: Path) -> dict:
    out = {
        "study_name": "bytes", "n_trials": args.trials,
        "base": {"model": args.model, "dataset": str(Path(args.dataset).resolve()), "image_size": args.image_size,
                 "epochs": args.epochs, "batch_size": 32, "pretrained": False, "device": "cpu",
                 "checkpoint_dir": str(checkpoints)},
        "space": {"lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}},
        "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
    }
    if args.keep_top_k != "none":
        out["keep_top_k"] = args.keep_top_k if args.keep_top_k == "all" else int(args.keep_top_k)
    return out


def store_bytes(root: Path) -> dict:
    """Bytes under the store's artifact root, and the weight files among them."""
    files = [p for p in root.rglob("*") if p.is_file()]
    weights = [p for p in files if p.name in WEIGHT_FILES]
    return {"total": sum(p.stat().st_size for p in files), "weights": sum(p.stat().st_size for p in weights),
            "weight_copies": len(weights), "weight_copy_bytes": max((p.stat().st_size for p in weights), default=0)}


def model_bytes(model: str) -> int:
    from research import models

    net = models.build_model(model, num_classes=20)  # the weights' shapes do not depend on the image size here
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not (Path(args.dataset) / "version.json").is_file():
        raise SystemExit(f"no dataset version at {args.dataset}: run `make demo` (builds data/versions/v3) first")
    with tempfile.TemporaryDirectory(prefix="artifact-bytes-") as tmp:
        tmp = Path(tmp)
        (tmp / "mlruns").mkdir()
        spec_path = tmp / "bytes.yaml"
        spec_path.write_text(yaml.safe_dump(spec(args, tmp / "checkpoints")))
        env = dict(os.environ, PYTHONPATH=str(args.code.resolve()), RESEARCH_MLRUNS=str(tmp / "mlruns"),
                   MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true")
        t0 = time.perf_counter()
        for cmd in (["sweep", str(spec_path), "--storage", f"journal:{tmp / 'bytes.journal'}"],
                    ["promote", "--study", "bytes"]):
            subprocess.run([sys.executable, "-m", "research", *cmd], cwd=tmp, env=env, check=True,
                           stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        measured = store_bytes(tmp / "mlruns" / "artifacts")
    copy_224 = model_bytes(args.model)
    result = {
        "code": str(args.code), "model": args.model, "image_size": args.image_size, "trials": args.trials,
        "epochs": args.epochs, "keep_top_k": args.keep_top_k, "seconds": round(seconds), **measured,
        "weight_copy_bytes_224": copy_224,
        # the same number of copies per trial (older code: 2 per trial + 1) or in all (keep rule), at 224 px
        f"projected_{args.project}_trials_224px": (
            copy_224 * (measured["weight_copies"] * args.project // args.trials) if args.keep_top_k in ("none", "all")
            else copy_224 * measured["weight_copies"]),
    }
    print(f"{args.trials} trials of {args.model} at {args.image_size} px, keep_top_k {args.keep_top_k}, "
          f"code {args.code} ({seconds:.0f} s)")
    print(f"  artifacts      {human(measured['total'])}")
    print(f"  weights        {human(measured['weights'])} in {measured['weight_copies']} copies "
          f"of {human(measured['weight_copy_bytes'])}")
    print(f"  projected      {human(result[f'projected_{args.project}_trials_224px'])} for {args.project} trials "
          f"at 224 px ({human(copy_224)} per copy)")
    if args.out:
        runs = json.loads(args.out.read_text()) if args.out.is_file() else []
        args.out.write_text(json.dumps([*runs, result], indent=2) + "\n")
    return result


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    main()
