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
