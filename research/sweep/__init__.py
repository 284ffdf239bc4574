"""Optuna studies over TrainConfig: one MLflow parent run per study, one child run per trial.

    spec.py      the study spec (sweeps/*.yaml): dataclasses, loading, validation against TrainConfig
    storage.py   journal / sqlite / PostgreSQL storage, the trial-slot lock, heartbeats, stale trials
    worker.py    the parent run, one trial = one `research.train.train`, workers, `sweep()`
    summary.py   the end of a study: parent run metrics, plots, the top trials, the promote command
    cli.py       `python -m research sweep`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from research.sweep.cli import add_arguments, run
from research.sweep.spec import (
    ObjectiveSpec,
    ParamSpec,
    PrunerSpec,
    SamplerSpec,
    SweepSpec,
    base_config,
    load_spec,
    nest,
)

# Names from the modules that import optuna, mlflow and torch, loaded on first use so that
# `python -m research sweep --help` (which imports this package) stays instant.
_LAZY = {
    "storage": ("default_storage_url", "make_storage", "slot_lock", "make_sampler", "make_pruner", "open_study",
                "Heartbeat", "fail_stale_trials"),
    "worker": ("FINISHED_STATES", "MAX_FAILS_IN_A_ROW", "parent_run_id", "start_study", "suggest", "next_trial",
               "run_worker", "run_trial", "sweep", "launch_workers"),
    "summary": ("summarize", "promote_command"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from research.sweep.storage import (
        Heartbeat,
        default_storage_url,
        fail_stale_trials,
        make_pruner,
        make_sampler,
        make_storage,
        open_study,
        slot_lock,
    )
    from research.sweep.summary import promote_command, summarize
    from research.sweep.worker import (
        FINISHED_STATES,
        MAX_FAILS_IN_A_ROW,
        launch_workers,
        next_trial,
        parent_run_id,
        run_trial,
        run_worker,
        start_study,
        suggest,
        sweep,
    )

# Spelled out (the names of _LAZY, in its order) so that linters see the lazy names as exported.
__all__ = [
    "ObjectiveSpec", "ParamSpec", "PrunerSpec", "SamplerSpec", "SweepSpec", "add_arguments", "base_config",
    "load_spec", "nest", "run",
    "default_storage_url", "make_storage", "slot_lock", "make_sampler", "make_pruner", "open_study", "Heartbeat",
    "fail_stale_trials",
    "FINISHED_STATES", "MAX_FAILS_IN_A_ROW", "parent_run_id", "start_study", "suggest", "next_trial", "run_worker",
    "run_trial", "sweep", "launch_workers",
    "summarize", "promote_command",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
