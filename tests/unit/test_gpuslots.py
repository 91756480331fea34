"""GPU slot allocator: distinct slots for concurrent jobs, freed on exit or crash (fake devices, CPU only)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from glrs import gpuslots
from glrs.errors import GlrsError

CTX = mp.get_context("fork")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", gpuslots.LOCKS_ENV, gpuslots.LOCK_DIR_ENV):
        monkeypatch.delenv(var, raising=False)


def _hold(n_devices, lock_dir, got, release, trying=None):
    if trying is not None:
        trying.set()
    with gpuslots.acquire_gpu(n_devices, lock_dir, poll=0.02) as dev:
        got.put((os.getpid(), dev))
        release.wait(30)


def _hold_then_crash(n_devices, lock_dir, got, never):
    with gpuslots.acquire_gpu(n_devices, lock_dir) as dev:
        got.put(dev)
        never.wait(60)  # never set: the test kills this process while it holds the slot


def test_concurrent_processes_get_distinct_slots(tmp_path):
    got, release = CTX.Queue(), CTX.Event()
    procs = [CTX.Process(target=_hold, args=(4, tmp_path, got, release)) for _ in range(4)]
    for p in procs:
        p.start()
    devices = sorted(got.get(timeout=30)[1] for _ in procs)
    release.set()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_more_jobs_than_gpus_wait_for_a_free_slot(tmp_path):
    got, release, trying = CTX.Queue(), CTX.Event(), CTX.Event()
    procs = [CTX.Process(target=_hold, args=(2, tmp_path, got, release)) for _ in range(2)]
    for p in procs:
        p.start()
    first = [got.get(timeout=30) for _ in range(2)]
    assert sorted(d for _, d in first) == ["cuda:0", "cuda:1"]
    procs.append(CTX.Process(target=_hold, args=(2, tmp_path, got, release, trying)))
    procs[-1].start()
    assert trying.wait(30)  # the third job has started asking for a slot
    with pytest.raises(TimeoutError):  # and there is none to give: both are held
        with gpuslots.acquire_gpu(2, tmp_path, timeout=0.2, poll=0.02):
            pass
    assert got.empty()  # so the third job is still waiting
    release.set()  # the first two leave; the third gets one of their slots
    _, third = got.get(timeout=30)
    assert third in ("cuda:0", "cuda:1")
    for p in procs:
        p.join(30)
        assert p.exitcode == 0


def test_slot_is_freed_when_the_block_ends(tmp_path):
    with gpuslots.acquire_gpu(2, tmp_path) as a:
        with gpuslots.acquire_gpu(2, tmp_path) as b:
            assert (a, b) == ("cuda:0", "cuda:1")
    with gpuslots.acquire_gpu(2, tmp_path) as c:
        assert c == "cuda:0"


def test_slot_is_freed_when_the_holder_crashes(tmp_path):
    got = CTX.Queue()
    p = CTX.Process(target=_hold_then_crash, args=(1, tmp_path, got, CTX.Event()))
    p.start()
    assert got.get(timeout=30) == "cuda:0"
    with pytest.raises(TimeoutError):
        with gpuslots.acquire_gpu(1, tmp_path, timeout=0.2, poll=0.05):
            pass
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    with gpuslots.acquire_gpu(1, tmp_path, timeout=5, poll=0.05) as dev:
        assert dev == "cuda:0"


def test_slot_is_freed_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with gpuslots.acquire_gpu(1, tmp_path):
            raise RuntimeError("job failed")
    with gpuslots.acquire_gpu(1, tmp_path, timeout=1) as dev:
        assert dev == "cuda:0"


def test_respects_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpuslots.visible_devices(2) == ["3", "5"]
    got, release = CTX.Queue(), CTX.Event()
    p = CTX.Process(target=_hold, args=(2, tmp_path, got, release))
    p.start()
    assert got.get(timeout=30)[1] == "cuda:0"
    assert (tmp_path / "gpu-3.lock").exists()
    with gpuslots.acquire_gpu(2, tmp_path) as dev:
        assert dev == "cuda:1"  # torch's index of physical GPU 5
        assert (tmp_path / "gpu-5.lock").exists()
    release.set()
    p.join(30)


def test_locks_are_per_physical_device_across_different_visible_lists(tmp_path, monkeypatch):
    # Two jobs that were shown different GPUs do not block each other, and two that share one do.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    with gpuslots.acquire_gpu(1, tmp_path) as a:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
        with gpuslots.acquire_gpu(1, tmp_path, timeout=0.2) as b:
            assert a == b == "cuda:0"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
        with pytest.raises(TimeoutError):
            with gpuslots.acquire_gpu(1, tmp_path, timeout=0.2, poll=0.05):
                pass


def test_no_gpus_gives_cpu(tmp_path):
    with gpuslots.acquire_gpu(0, tmp_path) as dev:
        assert dev == "cpu"
    assert not any(tmp_path.iterdir())


def test_inside_slurm_job_no_lock_is_taken(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with gpuslots.acquire_gpu(1, tmp_path) as a, gpuslots.acquire_gpu(1, tmp_path) as b:
        assert a == b == "cuda:0"
    assert not any(tmp_path.iterdir())


def test_device_slot(tmp_path, monkeypatch):
    with gpuslots.device_slot("cpu", tmp_path) as dev:
        assert dev == "cpu"
    with gpuslots.device_slot("cuda:7", tmp_path) as dev:
        assert dev == "cuda:7"
    monkeypatch.setattr(gpuslots, "_torch_device_count", lambda: 0)
    with gpuslots.device_slot("auto", tmp_path) as dev:
        assert dev == "cpu"
    with pytest.raises(GlrsError):
        with gpuslots.device_slot("cuda", tmp_path):
            pass
    monkeypatch.setattr(gpuslots, "_torch_device_count", lambda: 2)
    with gpuslots.device_slot("auto", tmp_path) as a, gpuslots.device_slot("cuda", tmp_path) as b:
        assert (a, b) == ("cuda:0", "cuda:1")
