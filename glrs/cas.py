"""Content addressing and atomic writes.

Every intermediate lives under a key derived from what made it: the keys of its
inputs, its parameters and the version of the code that computed it
(docs/design.md section 4). Keys are computed before anything runs, so Snakemake can
plan the whole DAG and find old outputs again when a parameter is reverted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

KEY_LENGTH = 12


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no spaces, floats as Python repr."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def key_of(stage: str, version: int, inputs: dict[str, str], params: dict[str, Any]) -> str:
    """Short sha256 over the stage name, its code version, input keys and parameters."""
    payload = canonical_json({"stage": stage, "version": version, "inputs": inputs, "params": params})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """glrs's per-user cache: $GLRS_CACHE_DIR, default ~/.cache/glrs."""
    return Path(os.environ.get("GLRS_CACHE_DIR") or Path.home() / ".cache" / "glrs")


def cached_file_hash(path: str | os.PathLike, cache_path: str | os.PathLike | None = None) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so that re-planning a
    multi-GB checkpoint costs a stat, not a read. The cache lives in $GLRS_CACHE_DIR
    (default ~/.cache/glrs); losing it only costs a re-hash."""
    path = Path(path).resolve()
    st = path.stat()
    ident = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = Path(cache_path or cache_dir() / "file-hashes.json")
    cache: dict[str, str] = {}
    if cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text())
        except (json.JSONDecodeError, OSError):
            cache = {}  # a damaged cache only costs a re-hash
    if ident not in cache:
        cache[ident] = sha256_file(path)
        with contextlib.suppress(OSError):
            write_text_atomic(cache_path, json.dumps(cache, indent=0, sort_keys=True))
    return cache[ident]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success fsync and rename it to `final`.

    On failure the temporary file is removed, so nothing that looks finished is
    ever left behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Like atomic_path for a directory: build it beside `final`, then rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
