"""Checkpoints: written atomically, read as data (weights_only), found by run id or path.

A checkpoint holds tensors and plain containers only (the config as a dict, the RNG states as
tensors), so `torch.load(..., weights_only=True)` reads it and a crafted file cannot run code.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from research.errors import ConfigError

DEFAULT_ROOT = "mlruns/checkpoints"  # TrainConfig.checkpoint_dir's default


def checkpoint_dir(root: str | Path, run_id: str) -> Path:
    return Path(root) / run_id


def atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, so a checkpoint loads with weights_only."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"state": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """torch.load with weights_only: a checkpoint is data (tensors, plain containers), never code."""
    if not path.is_file():
        raise ConfigError(f"No {what} at {path}: the run was interrupted before its first epoch finished; "
                          "start a new training instead.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, random, empty, or holding objects that are not plain data
        raise ConfigError(f"{path} is not a readable {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          "it may be truncated or not written by this trainer. Start a new training, or restore "
                          "the file from a backup.") from None


def find_checkpoint(ref: str, checkpoint_root: str | None = None) -> tuple[Path, str]:
    """A run id or a checkpoint path -> (checkpoint dir, run id)."""
    if not str(ref).strip():
        raise ConfigError("--resume needs a run id or a checkpoint path, got an empty value (an unset shell "
                          "variable?). List interrupted runs with `python -m research runs`.")
    path = Path(ref)
    if path.is_file():
        return path.parent, path.parent.name
    if path.is_dir():
        return path, path.name
    root = Path(checkpoint_root or DEFAULT_ROOT)
    if (root / ref).is_dir():
        return root / ref, ref
    raise ConfigError(
        f"No checkpoint for {ref!r} under {root}/. Pass the run id of a run that was interrupted "
        f"(its checkpoints live in {root}/<run_id>/) or a path to its last.pt."
    )
