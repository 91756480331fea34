"""The conditions that decide a cached output's bytes, and how to hold them fixed.

The content key of an output (docs/design.md section 4) names its inputs, parameters and
code version. Floating-point results also depend on *where* they were computed:
the device, the dtype, how many CPU threads split the reductions (a BLAS or a
torch reduction adds its partial sums in an order that depends on the thread
count), the torch version and the BLAS / LAPACK it was built with, and the CPU
instruction set the kernels were dispatched for. Every output records these
(`current`) in its metadata, and `glrs verify` recomputes under the recorded
ones (`pinned_threads`) or, where it cannot (another machine, a GPU), names the
conditions that differ (`differences`) and compares numerically.

Stage 1 does not depend on the caller's thread count at all: its CPU math runs
under `SOLVER_THREADS` whatever torch was set to (glrs.rpca.rpca).
"""
from __future__ import annotations

import contextlib
import functools
import platform
import re
from typing import Iterator

import torch

SOLVER_THREADS = 1  # CPU threads of the RPCA solver, fixed so that the bytes do not depend on the job's share
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve")


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op (and BLAS) thread count set to `threads`, then restore it.

    None leaves the count alone. Yields the count in force inside the block."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield before
        return
    torch.set_num_threads(int(threads))
    try:
        yield int(threads)
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _math_libraries() -> dict:
    """BLAS / LAPACK names and the math library's version line from torch.__config__."""
    show = torch.__config__.show()
    out = {}
    for key in ("BLAS_INFO", "LAPACK_INFO"):
        m = re.search(rf"{key}=([^,\s]+)", show)
        out[key.split("_")[0].lower()] = m.group(1) if m else "unknown"
    lib = [line.strip(" -") for line in show.splitlines() if "Math Kernel Library" in line or "OpenBLAS" in line]
    out["math_library"] = lib[0] if lib else ""
    return out


@functools.lru_cache(maxsize=1)
def _cpu() -> dict:
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        capability = "unknown"
    return {"cpu_capability": capability, "cpu_flags": sorted(flags & set(CPU_FLAGS)), "machine": platform.machine()}


def current(device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
            threads: int | None = None) -> dict:
    """The conditions an output computed now on `device` would be made under.

    `threads`: the CPU thread count the computation ran with (default: torch's
    current setting). On a GPU the device's name and the CUDA version are
    recorded too; the CPU fields stay (a GPU job still does some work on the CPU)."""
    device = torch.device(device)
    cond = {
        "device": device.type,
        "threads": int(threads if threads is not None else torch.get_num_threads()),
        "torch": torch.__version__,
        **_math_libraries(),
        **_cpu(),
    }
    if dtype is not None:
        cond["dtype"] = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        cond["gpu"] = torch.cuda.get_device_name(device)
        cond["cuda"] = torch.version.cuda or ""
    return cond


def differences(recorded: dict | None, now: dict) -> list[str]:
    """Human-readable 'name: recorded -> now' for every condition that differs (missing ones included)."""
    if not recorded:
        return ["conditions: not recorded in the file"]
    keys = sorted(set(recorded) | set(now))
    return [f"{k}: {recorded.get(k, '-')} -> {now.get(k, '-')}" for k in keys if recorded.get(k) != now.get(k)]


def device_for(recorded: dict | None) -> str:
    """The device to recompute on: the recorded one when this machine has it, else the CPU."""
    if recorded and recorded.get("device") == "cuda" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def packages(*names: str) -> dict:
    """Versions of Python packages whose behaviour decides an output (e.g. the tokenizer's)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def input_keys(stage1_keys: dict, calib_file: str | None = None, stats_files: list[str] | None = None) -> dict:
    """Where an allocation's inputs live, as keys under the results tree, so that `glrs verify` can
    recompute it without the config: Stage 1's model key, Stage-1 key and layers (glrs.stage1.Stage1.keys:
    rpca/<model>/<rpca>/layer_<i>.safetensors, or under stage1 weights the model's own weights),
    calib/<model>/<calib>.safetensors, stats/<model>/<stats>/layer_<i>.safetensors; `stage1` says which."""
    from pathlib import Path

    keys = {k: stage1_keys[k] for k in ("model_key", "stage1_key", "layers", "stage1")}
    if calib_file:
        keys["calib_key"] = Path(calib_file).stem
    if stats_files:
        keys["stats_key"] = Path(stats_files[0]).parent.name
    return keys
