"""Reliability suite (issue 10): bad inputs, killed runs and workers, concurrent studies, dead servers.

Every test injects one fault into the real stack (real files, real MLflow sqlite store, real Optuna
journal/PostgreSQL storage, real `python -m research` processes) and checks that nothing is lost.
The helpers below start those processes and always kill them (by pid) when a test ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m research` child: this one + the repo on the path, one thread per
    process when several share the 2 cores, no telemetry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"  # rich wraps error lines at 80 columns otherwise
    # one torch thread: on a shared 2-core box, OpenMP threads spin-wait for busy cores (3-4x slower);
    # a reference run and the run compared with it must also use the same thread count
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def research_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "research", *map(str, args)]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    """Run `python -m research ARGS` to the end; returns CompletedProcess (text) and its wall time."""
    t0 = time.perf_counter()
    out = subprocess.run(research_cmd(*args), cwd=cwd, env=env or cli_env(), capture_output=True, text=True,
                         timeout=timeout)
    return out, time.perf_counter() - t0


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`python -m research ARGS` in this process (research.cli.main: the same boundary); (code, stdout, stderr).

    For the cases where the process itself is not what is tested: a fresh interpreter costs seconds of imports."""
    from research.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def start_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start `python -m research ARGS` in its own process group; stdout+stderr go to `log` (or /dev/null)."""
    fh = open(log, "w") if log else subprocess.DEVNULL
    # SIGINT back to its default in the child: a suite started in the background by a non-interactive shell
    # inherits SIGINT ignored (POSIX), and then the Ctrl-C tests' signals would never arrive
    proc = subprocess.Popen(research_cmd(*args), cwd=cwd, env=env or cli_env(), stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill one process we started (and its group: a sweep worker's children), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate()` until it returns something truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def tail(path: Path | None, n: int = 3000) -> str:
    if path is None or not Path(path).exists():
        return ""
    return Path(path).read_text(errors="replace")[-n:]


def tree_fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry under root (symlinks not followed): kind, mode, size, mtime and content hash or link target."""
    out: dict[str, tuple] = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                out[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def files_under(root: Path) -> list[str]:
    """Every path under root (relative, sorted); [] when root does not exist."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def tiny_train_config(version: Path, checkpoint_dir: Path, **changes) -> dict:
    """TrainConfig keys for a fast CPU run on the tiny version (resnet18, 32 px, batch 8)."""
    return {
        "model": "resnet18", "dataset": str(version), "image_size": 32, "batch_size": 8, "epochs": 1,
        "lr": 0.01, "lr_schedule": "constant", "device": "cpu", "seed": 0, "experiment": "reliability",
        "checkpoint_dir": str(checkpoint_dir), **changes,
    }


def tiny_sweep_spec(version: Path, checkpoint_dir: Path, study_name: str, n_trials: int, epochs: int,
                    **changes) -> dict:
    """A sweep spec over the tiny version: lr x sampler, random sampler, no pruning, 1 s heartbeats."""
    return {
        "study_name": study_name, "n_trials": n_trials,
        "base": tiny_train_config(version, checkpoint_dir, epochs=epochs, experiment=f"sweep-{study_name}"),
        "space": {"lr": {"type": "float", "low": 1e-3, "high": 0.1, "log": True},
                  "sampler": {"type": "categorical", "choices": ["shuffle", "weighted"]}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "heartbeat_interval": 1, "heartbeat_grace": 5,
        **changes,
    }


def prepare_study(spec_dict: dict, spec_path: Path, storage: str):
    """Write the spec file, create the study and its MLflow parent run once (as `sweep --workers N` does
    before it starts workers); returns (SweepSpec, parent run id)."""
    import yaml

    from research import configfile
    from research.sweep import SweepSpec, open_study, parent_run_id, slot_lock

    spec = configfile.from_dict(SweepSpec, spec_dict)
    spec_path.write_text(yaml.safe_dump(spec_dict))
    with slot_lock(storage):
        study = open_study(spec, storage)
        parent = parent_run_id(study, spec, None)
    return spec, parent


def start_workers(n: int, spec_path: Path, storage: str, study_name: str, cwd: Path, logs: Path,
                  env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """n `sweep --worker-only` processes on one study, one torch thread each (they share 2 cores)."""
    env = env or cli_env()
    env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    return [start_cli("sweep", spec_path, "--worker-only", "--storage", storage, "--study-name", study_name,
                      cwd=cwd, env=env, log=logs / f"worker{i}.log") for i in range(n)]


def child_runs(parent_run_id: str):
    """The MLflow child runs (one per trial) of a study's parent run."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)


def refused(argv: list, capsys) -> str:
    """Run one command in this process (`research.cli.main`): it must exit 2 with one `error:` line and no
    traceback (a `log:` line, or a library's own warning, may stand beside it); returns that line."""
    from research.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, code, err[-3000:])
    return lines[0]


def styled_clean_dir(root: Path, drawn: dict[str, dict[str, int]], size: int = 32) -> Path:
    """A clean dir (manifest.csv with `style` and `group`, clean.json) over real drawings under root/src:
    `drawn` is {class: {style: how many}}; each drawing its own group, as the embedded dataset's style:emoji."""
    import json

    import numpy as np
    import pandas as pd

    from tests.conftest import draw_image

    rng = np.random.default_rng(0)
    rows = []
    for c, (cls, styles) in enumerate(drawn.items()):
        (root / "src" / cls).mkdir(parents=True)
        for style, n in styles.items():
            for i in range(n):
                rel = f"{cls}/{style}_{i}.png"
                draw_image(("circle", "square", "stripe")[c % 3], size, rng).save(root / "src" / rel)
                rows.append({"path": rel, "class": cls, "style": style, "group": f"{style}:{cls}:{i}",
                             "sha256": hashlib.sha256((root / "src" / rel).read_bytes()).hexdigest()})
    clean = root / "clean"
    clean.mkdir()
    pd.DataFrame(rows).to_csv(clean / "manifest.csv", index=False)
    (clean / "clean.json").write_text(json.dumps({"source": str((root / "src").resolve()), "method": "none"}))
    return clean
