"""Checkpoints are data, not code: `train --resume` under crafted, damaged or foreign checkpoints (issue 19, 7-8)."""

from __future__ import annotations

import pytest

from research.errors import ConfigError
from research.train import resume


def test_a_checkpoint_is_data_not_code(tiny_version, mlflow_store, tmp_path):
    """resume loads with weights_only: a pickle that runs code is refused, and so is a truncated file."""
    import pickle

    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckdir = tmp_path / "ckpt" / "0123abcd"
    ckdir.mkdir(parents=True)
    (ckdir / "last.pt").write_bytes(pickle.dumps({"config": Evil()}))
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        resume(str(ckdir / "last.pt"))
    assert not marker.exists()
    torch.save({"a": torch.zeros(3)}, ckdir / "last.pt")
    (ckdir / "last.pt").write_bytes((ckdir / "last.pt").read_bytes()[:40])
    with pytest.raises(ConfigError, match="truncated"):
        resume(str(ckdir / "last.pt"))
    with pytest.raises(ConfigError, match="empty value"):
        resume("")


@pytest.mark.slow
def test_a_checkpoint_of_a_run_not_in_the_store_names_the_store(tiny_version, mlflow_store, tmp_path):
    import torch

    from research import configfile
    from tests.conftest import tiny_cfg

    ckdir = tmp_path / "ckpt" / "feedface"
    ckdir.mkdir(parents=True)
    torch.save({"config": configfile.to_dict(tiny_cfg(tiny_version, tmp_path))}, ckdir / "last.pt")
    with pytest.raises(ConfigError, match="not in the tracking store .*MLFLOW_TRACKING_URI"):
        resume(str(ckdir / "last.pt"))


def test_best_is_a_second_name_of_the_improving_epochs_checkpoint(tmp_path):
    """An improving epoch writes its checkpoint once: best.pt is a hard link of that last.pt, renamed into place
    first; the next epoch's last.pt replaces only last.pt, so best.pt keeps the best epoch. A save that fails
    changes neither file and leaves no temporary file."""
    import os

    import torch

    from research import checkpoints

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    checkpoints.atomic_save({"kept": {"w": torch.ones(2)}, "epoch": 1}, last, best)
    assert os.stat(last).st_ino == os.stat(best).st_ino  # one file, two names: written once
    checkpoints.atomic_save({"kept": {"w": torch.zeros(2)}, "epoch": 2}, last)
    assert os.stat(last).st_ino != os.stat(best).st_ino
    assert torch.equal(checkpoints.kept_weights(best)["w"], torch.ones(2))
    assert torch.load(last, weights_only=True)["epoch"] == 2

    class Unsaveable:  # torch.save fails on it mid-write
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoints.atomic_save({"x": Unsaveable()}, last, best)
    assert torch.equal(checkpoints.kept_weights(best)["w"], torch.ones(2))
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    torch.save({"w": torch.full((2,), 3.0)}, best)  # a best.pt of weights only, as written before this format
    assert torch.equal(checkpoints.kept_weights(best)["w"], torch.full((2,), 3.0))
