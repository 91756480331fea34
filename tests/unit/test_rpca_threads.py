"""The RPCA solver's bytes do not depend on torch's thread count (issue 13).

576 x 1536 (a SmolLM2 MLP shape) is large enough for the BLAS to split its products between
threads; a few ALM iterations are enough to see the last bits move when it does.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from glrs import conditions, rpca

ITERATIONS = {"gram": 6, "subspace": 2}  # the subspace SVT's first calls are its slow ones


def _matrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(13)
    low = torch.randn(576, 24, generator=g) @ torch.randn(24, 1536, generator=g)
    return (0.02 * low + 0.02 * torch.randn(576, 1536, generator=g)).float()


def _digest(W: torch.Tensor, threads: int, svt_method: str, pinned: bool) -> str:
    with conditions.pinned_threads(threads):
        kwargs = {} if pinned else {"threads": None}
        res = rpca.rpca(W, tol=1e-12, max_iter=ITERATIONS[svt_method], svt_method=svt_method, **kwargs)
        assert torch.get_num_threads() == threads  # the caller's setting is restored
    values, index = rpca.sort_sparse(res.S)
    h = hashlib.sha256()
    for t in (res.U, res.sigma, res.V, values, index):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("svt_method", ["gram", "subspace"])
def test_same_bytes_with_one_and_two_threads(svt_method):
    W = _matrix()
    assert _digest(W, 1, svt_method, pinned=True) == _digest(W, 2, svt_method, pinned=True)


def test_the_matrix_is_large_enough_to_show_the_thread_dependence():
    """Without the fixed thread count the same solve differs between 1 and 2 threads (the bug the
    test above guards against); skipped where this BLAS does not split the work."""
    W = _matrix()
    if _digest(W, 1, "gram", pinned=False) == _digest(W, 2, "gram", pinned=False):
        pytest.skip("this BLAS gives the same bytes with 1 and 2 threads even without pinning")


def test_pinned_threads_restores_and_records():
    before = torch.get_num_threads()
    with conditions.pinned_threads(1) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    res = rpca.rpca(_matrix()[:64, :96], max_iter=3)
    assert res.stats["threads"] == conditions.SOLVER_THREADS
    cond = conditions.current("cpu", "float64", threads=1)
    assert cond["threads"] == 1 and cond["dtype"] == "float64" and cond["torch"] == torch.__version__
    assert conditions.differences(cond, cond) == []
    assert conditions.differences(cond, cond | {"threads": 2}) == ["threads: 1 -> 2"]
