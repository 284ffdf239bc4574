"""`python -m research sweep SPEC`: argument parsing only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from research import configfile
from research.sweep.spec import load_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="a sweep spec (sweeps/*.yaml)")
    parser.add_argument("--n-trials", type=int)
    parser.add_argument("--timeout", type=float, help="seconds per worker")
    parser.add_argument("--study-name")
    parser.add_argument("--storage",
                        help="journal:PATH (default mlruns/optuna.journal), postgresql://..., sqlite:///...")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine: with several GPUs one GPU each (round-robin over "
                             "the visible ones), with one GPU they share it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, e.g. --set base.epochs=2")
    # a worker process started by `--workers N`, on the resolved spec (JSON) it was handed
    parser.add_argument("--worker-only", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    # torch, optuna and mlflow load here, when a sweep runs, so that `sweep --help` stays instant
    from research.sweep.worker import run_worker, sweep

    overrides = configfile.parse_overrides(args.overrides)
    for key in ("n_trials", "timeout", "study_name"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    path = Path(args.spec)
    spec = load_spec(path, overrides)
    if args.worker_only:
        run_worker(spec, args.storage)
        return 0
    summary = sweep(spec, args.storage, workers=args.workers, spec_path=None if path.suffix == ".json" else str(path))
    if not summary["counts"].get("COMPLETE"):  # a study without a result is not a success, whatever else ran
        counts = ", ".join(f"{n} {state.lower()}" for state, n in summary["counts"].items() if n) or "no trials"
        print(f"error: study {spec.study_name} ended with no completed trial ({counts}); the trials' errors are "
              "above. Fix them, then run the same command again: the study resumes.", file=sys.stderr)
        return 1
    return 0
