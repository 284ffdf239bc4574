"""`sweep --workers N`: one GPU each over several, sharing one, splitting the cores without; a seed per worker."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch

from research.sweep import load_spec, make_sampler, suggest
from research.sweep.worker import placement_line, visible_gpus, worker_device_envs, worker_sampler_seed

GPU_SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "transfer_gpu.yaml"


def test_workers_get_their_own_gpu_round_robin_over_the_visible_ones():
    envs = worker_device_envs(["2", "3"], workers=4, cores=16)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3", "2", "3"]
    assert all("OMP_NUM_THREADS" not in e for e in envs)


def test_gpu_uuids_are_handed_on_as_the_user_named_them():
    uuids = ["GPU-1a2b", "GPU-3c4d", "GPU-5e6f"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_device_envs(uuids, 3, cores=8)] == uuids


def test_workers_share_a_single_gpu_and_keep_the_parents_environment():
    assert worker_device_envs(["0"], workers=3, cores=16) == [{}, {}, {}]


def test_without_a_gpu_workers_split_the_cores():
    envs = worker_device_envs([], workers=3, cores=8)
    assert envs == [{"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}] * 3
    assert worker_device_envs([], workers=4, cores=2)[0]["OMP_NUM_THREADS"] == "1"


def test_the_placement_line_says_when_workers_share_a_gpu_and_what_to_pick():
    shared = placement_line(["0"], 4)
    assert "4 workers share the one visible GPU" in shared and "--workers 1" in shared
    assert placement_line(["0", "1", "2", "3"], 4) == "4 workers, one GPU each (CUDA_VISIBLE_DEVICES 0,1,2,3)."
    crowded = placement_line(["0", "1"], 3)
    assert "up to 2 share a GPU" in crowded and "--workers 2" in crowded
    assert placement_line([], 4) is None and placement_line(["0"], 1) is None


def test_visible_gpus_are_the_usable_ones_named_as_cuda_visible_devices_names_them(monkeypatch):
    # the count is CUDA's answer (it stops at the first invalid entry); the names are the user's
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,bogus")
    assert visible_gpus() == ["GPU-1a2b"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert visible_gpus() == []


def test_each_worker_draws_its_own_params():
    # the same seed in every worker drew the same trial in each (seen in the e2e smoke run before the fix)
    spec = load_spec(GPU_SPEC)
    assert worker_sampler_seed(spec, 0) is spec
    firsts = []
    for index in range(3):
        worker_spec = worker_sampler_seed(spec, index)
        assert worker_spec.sampler.seed == spec.sampler.seed + index
        study = optuna.create_study(sampler=make_sampler(worker_spec), direction="maximize")
        firsts.append(suggest(study.ask(), worker_spec.space))
    assert len({tuple(sorted(p.items())) for p in firsts}) == 3
