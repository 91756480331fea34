"""Content keys and atomic writes (docs/design.md section 4)."""
import pytest

from glrs import cas


def test_key_is_stable_and_sensitive_to_every_part():
    base = cas.key_of("rpca", 1, {"model": "abc"}, {"tol": 1e-7, "rho": 1.5})
    assert base == cas.key_of("rpca", 1, {"model": "abc"}, {"rho": 1.5, "tol": 1e-7})  # key order is irrelevant
    assert len(base) == cas.KEY_LENGTH
    variants = [
        cas.key_of("rpca", 2, {"model": "abc"}, {"tol": 1e-7, "rho": 1.5}),
        cas.key_of("rpca", 1, {"model": "abd"}, {"tol": 1e-7, "rho": 1.5}),
        cas.key_of("rpca", 1, {"model": "abc"}, {"tol": 1e-6, "rho": 1.5}),
        cas.key_of("alloc", 1, {"model": "abc"}, {"tol": 1e-7, "rho": 1.5}),
    ]
    assert len({base, *variants}) == 5


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with cas.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "d"
    with cas.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with cas.atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash")
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_cached_file_hash_follows_content(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"hello")
    cache = tmp_path / "cache.json"
    first = cas.cached_file_hash(f, cache)
    assert first == cas.sha256_file(f) and cache.is_file()
    f.write_bytes(b"hello, world")  # size changes, so the cache entry no longer applies
    assert cas.cached_file_hash(f, cache) == cas.sha256_file(f) != first
