"""One GPU per job on a many-GPU host: a file-lock slot allocator.

`snakemake --cores N --resources gpu=K` runs up to K GPU jobs at once, but
Snakemake only counts them; it does not say which GPU each should use. Every
job therefore takes the first GPU whose lock file it can lock:

    with acquire_gpu() as device:      # "cuda:2", or "cpu" on a host without GPUs
        ...

The lock is an `flock` on `<lock_dir>/gpu-<id>.lock`, where `<id>` is the
physical device id (the CUDA_VISIBLE_DEVICES entry when that is set, else the
ordinal). The kernel drops an flock when the last descriptor of the open file
goes away, so a slot is freed when the job leaves the `with` block, exits, or
crashes (even on SIGKILL); there is no stale-lock cleanup to do.

CUDA_VISIBLE_DEVICES is respected: only the devices it lists are candidates,
and the device string returned is torch's index into that list. The
environment is not changed, so this works whether or not CUDA is already
initialised in the process.

Inside a Slurm job (SLURM_JOB_ID set) no lock is taken: Slurm has already
given the job its own GPUs and, with device cgroups, renumbers them from 0 in
every job, so a host-wide lock on "gpu-0" would make jobs on different GPUs
wait for each other. GLRS_GPU_LOCKS=0 turns locking off everywhere.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

LOCK_DIR_ENV = "GLRS_GPU_LOCK_DIR"
LOCKS_ENV = "GLRS_GPU_LOCKS"
MEMORY_CAP_ENV = "GLRS_GPU_MEMORY_GB"  # cap every GPU job's memory (a smaller card's budget on a bigger one)


def memory_cap_bytes() -> int | None:
    """The GPU memory cap in bytes from GLRS_GPU_MEMORY_GB, or None when unset."""
    raw = os.environ.get(MEMORY_CAP_ENV, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        from .errors import GlrsError

        raise GlrsError(f"{MEMORY_CAP_ENV}={raw!r} is not a positive number of GiB; e.g. {MEMORY_CAP_ENV}=24")
    return int(gb * 2**30)


def apply_memory_cap(device: str) -> None:
    """Limit this process's allocations on `device` to the cap (torch.cuda.set_per_process_memory_fraction):
    a job that needs more fails with CUDA out of memory, as on a card of that size."""
    cap = memory_cap_bytes()
    if cap is None or not str(device).startswith("cuda"):
        return
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)


def default_lock_dir() -> Path:
    """Node-local and shared by all users: <tmp>/glrs-gpu-locks (override with GLRS_GPU_LOCK_DIR)."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "glrs-gpu-locks")


def visible_devices(n_devices: int | None = None) -> list[str]:
    """Physical ids of the GPUs this process may use, in torch's order.

    `n_devices` is the number torch sees (torch.cuda.device_count() when None).
    With CUDA_VISIBLE_DEVICES set, the ids are its first `n_devices` entries
    (indices, UUIDs or MIG ids alike); without it, "0".."n-1"."""
    if n_devices is None:
        n_devices = _torch_device_count()
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [d.strip() for d in cvd.split(",") if d.strip()]
        # CUDA stops at the first invalid entry (e.g. "-1"): torch sees only the ones before it.
        return ids[:n_devices]
    return [str(i) for i in range(n_devices)]


def _torch_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _lock_name(physical_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in physical_id)
    return f"gpu-{safe}.lock"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on `path`, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _make_lock_dir(lock_dir: Path) -> None:
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # shared between users, like /tmp itself
        os.chmod(lock_dir, 0o1777)


@contextlib.contextmanager
def acquire_gpu(n_devices: int | None = None, lock_dir: str | os.PathLike | None = None,
                timeout: float | None = None, poll: float = 0.5) -> Iterator[str]:
    """Hold one free GPU for the duration of the block; yields "cuda:<i>" or "cpu".

    `n_devices`: how many GPUs torch sees (default: ask torch). 0 gives "cpu".
    Waits while all GPUs are taken (another user's jobs, or more jobs than
    GPUs); `timeout` seconds (None: forever) then TimeoutError."""
    devices = visible_devices(n_devices)
    if not devices:
        yield "cpu"
        return
    if os.environ.get("SLURM_JOB_ID") or os.environ.get(LOCKS_ENV, "1") == "0":
        yield "cuda:0"
        return
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    _make_lock_dir(lock_dir)
    start = time.monotonic()
    told = False
    while True:
        for index, physical in enumerate(devices):
            fd = _try_lock(lock_dir / _lock_name(physical))
            if fd is not None:
                try:
                    yield f"cuda:{index}"
                finally:
                    os.close(fd)  # releases the flock
                return
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"no free GPU among {devices} after {waited:.0f} s (locks in {lock_dir})")
        if not told:
            print(f"glrs: all {len(devices)} GPUs {devices} are taken (locks in {lock_dir}); waiting",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(poll)


@contextlib.contextmanager
def device_slot(device: str = "auto", lock_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """The device a GPU job should use, holding its slot while the block runs.

    "auto": a free GPU if torch sees any, else "cpu". "cuda": a free GPU, or
    GlrsError without one. Anything explicit ("cpu", "cuda:3") is used as given,
    without a lock: the user chose it."""
    if device not in ("auto", "cuda"):
        apply_memory_cap(device)
        yield device
        return
    n = _torch_device_count()
    if n == 0:
        if device == "cuda":
            from .errors import GlrsError

            raise GlrsError("device 'cuda' was asked for but torch sees no GPU; set device: auto or cpu")
        yield "cpu"
        return
    with acquire_gpu(n, lock_dir) as dev:
        apply_memory_cap(dev)
        yield dev
