"""Checkpoints: written atomically, read as data (weights_only), found by run id or path; who trains a run.

A checkpoint holds tensors and plain containers only (the config as a dict, the RNG states as
tensors), so `torch.load(..., weights_only=True)` reads it and a crafted file cannot run code.

A run that a process is training holds a lock beside its checkpoint (`live.json`: pid, host, process start
time; its mtime is a heartbeat, refreshed every HEARTBEAT_SECONDS by a thread). The lock is stale once its
process is gone (same host: the pid no longer runs, or runs another program) or, for a lock taken on another
host, once its heartbeat is older than STALE_SECONDS. `resumability` is the one rule for which runs
`train --resume` continues and whose checkpoints `gc` keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from research.errors import ConfigError
from research.locks import file_lock

DEFAULT_ROOT = "mlruns/checkpoints"  # TrainConfig.checkpoint_dir's default
LOCK = "live.json"  # beside last.pt while a process trains the run
HEARTBEAT_SECONDS = 30.0
# another host's lock counts as stale after this long without a heartbeat: 10 heartbeats, so a loaded box or a
# slow shared file system does not lose a live run; clocks must agree to within a minute or so
STALE_SECONDS = 300.0
LIVE, RESUMABLE, ENDED = "live", "resumable", "ended"


def checkpoint_dir(root: str | Path, run_id: str) -> Path:
    return Path(root) / run_id


def atomic_save(obj: Any, path: Path, *also: Path) -> None:
    """torch.save to a temporary file, then renamed: `path` is always a whole file, old or new. Each of `also` is
    made a second name (a hard link) of the same file before `path` is, so the file is written once; `also`
    is renamed into place first, so after a crash it is never older than `path`."""
    names = [tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.") for target in (path, *also)]
    for fd, _ in names:
        os.close(fd)
    tmps = [tmp for _, tmp in names]
    try:
        torch.save(obj, tmps[0])
        for tmp, target in zip(tmps[1:], also):
            os.unlink(tmp)
            os.link(tmps[0], tmp)
            os.replace(tmp, target)
        os.replace(tmps[0], path)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def kept_weights(path: Path) -> dict[str, torch.Tensor]:
    """The evaluated weights in a checkpoint (`best.pt`: the best epoch's whole checkpoint, under "kept")."""
    checkpoint = load_checkpoint(path, what="best weights")
    return checkpoint["kept"] if "kept" in checkpoint else checkpoint  # a best.pt written before 2026-12: weights only


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


# ------------------------------------------------------------------------------ who trains a run now

@dataclasses.dataclass(frozen=True)
class Holder:
    """The process that holds a run's lock."""

    pid: int
    host: str
    started: float  # the process's start time: a pid reused by another program is not the holder
    heartbeat: float  # the lock file's mtime
    run_id: str = ""

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host} (heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago)"


def _me() -> tuple[int, str, float]:
    import psutil

    return os.getpid(), socket.gethostname(), psutil.Process().create_time()


def _read_holder(ckdir: Path) -> Holder | None:
    path = Path(ckdir) / LOCK
    try:
        heartbeat = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        data = json.loads(path.read_text())
        return Holder(int(data["pid"]), str(data["host"]), float(data["started"]), heartbeat,
                      str(data.get("run_id", "")))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: judged by its heartbeat alone
        return Holder(-1, "unknown", 0.0, heartbeat)


def alive(holder: Holder) -> bool:
    """Whether the process of a lock (or of a run's writer, research/artifacts.py) still runs."""
    if holder.host != socket.gethostname() or holder.pid < 0:
        return time.time() - holder.heartbeat < STALE_SECONDS
    import psutil

    try:
        return abs(psutil.Process(holder.pid).create_time() - holder.started) < 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:  # another user's process with that pid: it exists, so it may be the holder
        return True


def live_holder(ckdir: str | Path) -> Holder | None:
    """The process training the run of `ckdir` now (this one included), or None: no lock, or a stale one."""
    holder = _read_holder(Path(ckdir))
    return holder if holder is not None and alive(holder) else None


_held: dict[Path, int] = {}  # lock path -> nesting depth, in this process


@contextlib.contextmanager
def live_run(ckdir: str | Path, run_id: str) -> Iterator[None]:
    """Hold the run's lock while the block trains it; a ConfigError naming pid and host when another process
    holds it. Re-entrant in one process. After an error the lock goes at once; after success it stays (without
    heartbeat, its process still alive) until the run's end removes the checkpoint folder with it, so no other
    process can resume the run between its last epoch and its end."""
    path = Path(ckdir) / LOCK
    key = path.absolute()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    _acquire(path, run_id)
    _held[key] = 1
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), name=f"heartbeat {run_id}", daemon=True)
    beat.start()
    try:
        yield
    except BaseException:
        _release(path)
        raise
    finally:
        stop.set()
        beat.join(timeout=5)
        del _held[key]


def _acquire(path: Path, run_id: str) -> None:
    pid, host, started = _me()
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.parent / ".live.guard"):  # two resumes at once: one takes it, the other sees it taken
        holder = live_holder(path.parent)
        if holder is not None and (holder.pid, holder.host) != (pid, host):
            raise ConfigError(f"Run {run_id} is being trained now by {holder} (lock {path}); a second process "
                              "would log every epoch twice and overwrite its checkpoints. Wait for it to end, or stop "
                              f"it (Ctrl-C; or kill {holder.pid} on {holder.host}) and resume then.")
        tmp = path.with_name(f".{LOCK}.{pid}")
        tmp.write_text(json.dumps({"pid": pid, "host": host, "started": started, "run_id": run_id}) + "\n")
        os.replace(tmp, path)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(OSError):  # the folder may be going away with the run's end
            os.utime(path)


def _release(path: Path) -> None:
    holder = _read_holder(path.parent)
    pid, host, _ = _me()
    if holder is not None and (holder.pid, holder.host) == (pid, host):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ------------------------------------------------------------------------------ which runs resume

@dataclasses.dataclass(frozen=True)
class Verdict:
    state: str  # LIVE, RESUMABLE or ENDED
    why: str


def resumability(ckdir: str | Path, status: str, deleted: bool = False) -> Verdict:
    """The one rule `train --resume` and `gc` follow: a run is resumable iff it is not FINISHED (nor deleted),
    its folder holds a last.pt, and no other process trains it now (LIVE). gc never frees a LIVE run's folder,
    frees a RESUMABLE one's only when asked (`gc --resumable`), and frees an ENDED one's."""
    ckdir = Path(ckdir)
    holder = live_holder(ckdir)
    if holder is not None and (holder.pid, holder.host) != _me()[:2]:
        return Verdict(LIVE, f"being trained now by {holder}")
    if deleted:
        return Verdict(ENDED, "deleted in MLflow")
    if status == "FINISHED":
        return Verdict(ENDED, "finished")
    if not (ckdir / "last.pt").is_file():
        return Verdict(ENDED, f"{status.lower()}, stopped before its first epoch was checkpointed")
    return Verdict(RESUMABLE, f"{status.lower()}, resumable (last.pt)")


def check_resumable(ckdir: str | Path, run_id: str, status: str, deleted: bool = False) -> None:
    """A ConfigError unless `resumability` says the run may be resumed."""
    verdict = resumability(ckdir, status, deleted)
    if verdict.state == LIVE:
        raise ConfigError(f"Run {run_id} is {verdict.why}; a second process would log every epoch twice and "
                          "overwrite its checkpoints. Wait for it to end, or stop it and resume then.")
    if verdict.state == ENDED and status == "FINISHED":
        raise ConfigError(f"Run {run_id} already finished; nothing to resume.")
    if verdict.state == ENDED:
        raise ConfigError(f"Cannot resume run {run_id}: {verdict.why}. Start a new training instead.")
