"""The non-learned allocators: exact budgets, sensible splits, and a clear error for an impossible budget."""
import pytest
import torch

from glrs import allocate
from glrs.errors import GlrsError


def pools():
    g = torch.Generator().manual_seed(0)
    out = []
    for layer, (m, n) in enumerate([(32, 48), (64, 32), (40, 40)]):
        R, K = min(m, n) - 4, int(0.6 * m * n)
        sigma = torch.sort(torch.rand(R, generator=g, dtype=torch.float64) * (layer + 1), descending=True).values
        s_abs = torch.sort(torch.rand(K, generator=g, dtype=torch.float64), descending=True).values
        out.append(allocate.MatrixPool(f"m{layer}", layer, "q", (m, n), sigma, s_abs))
    return out


@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("allocator", [allocate.uniform, allocate.rpca_threshold])
def test_budget_is_met_within_a_tenth_of_a_point(allocator, density):
    p = pools()
    alloc = allocator(p, density, rank_fraction=0.5)
    info = allocate.summarize(p, alloc, density)
    assert info["params_kept"] <= allocate.budget_for(p, density)
    assert abs(info["achieved_density"] - density) < 1e-3


def test_uniform_gives_every_matrix_the_same_density():
    p = pools()
    info = allocate.summarize(p, allocate.uniform(p, 0.5, rank_fraction=0.5), 0.5)
    for m in info["matrices"].values():
        rows, cols = m["shape"]
        assert abs((m["rank"] * (rows + cols) + m["nnz"]) / (rows * cols) - 0.5) < 0.02


def test_rpca_threshold_prefers_the_largest_singular_values_globally():
    p = pools()
    alloc = allocate.rpca_threshold(p, 0.3, rank_fraction=1.0)
    kept = torch.cat([pl.sigma[alloc.rank_keep[pl.name]] for pl in p])
    dropped = torch.cat([pl.sigma[~alloc.rank_keep[pl.name]] for pl in p])
    assert kept.min() >= dropped.max() - 1e-12 or kept.numel() == 0


def test_impossible_budget_names_the_fix():
    few = [allocate.MatrixPool("m", 0, "q", (10, 10), torch.ones(2, dtype=torch.float64), torch.ones(30, dtype=torch.float64))]
    assert allocate.budget_for(few, 0.7) == 70  # 2 * 20 + 30 candidates
    with pytest.raises(GlrsError, match="lower target_density"):
        allocate.budget_for(few, 0.71)


def test_masks_round_trip(tmp_path):
    p = pools()
    alloc = allocate.uniform(p, 0.5)
    allocate.save(alloc, {"x": 1}, tmp_path / "a.json", tmp_path / "a.safetensors")
    back = allocate.load_masks(tmp_path / "a.safetensors")
    assert all(torch.equal(back.rank_keep[k], v) for k, v in alloc.rank_keep.items())
    assert all(torch.equal(back.sparse_keep[k], v) for k, v in alloc.sparse_keep.items())
