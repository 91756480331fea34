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
    info = allocate.summarise(p, alloc, density)
    assert info["params_kept"] <= allocate.budget_for(p, density)
    assert abs(info["achieved_density"] - density) < 1e-3


def test_uniform_gives_every_matrix_the_same_density():
    p = pools()
    info = allocate.summarise(p, allocate.uniform(p, 0.5, rank_fraction=0.5), 0.5)
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


def test_owl_densities_follow_the_outlier_shares_and_keep_the_mean():
    shares = [0.01, 0.05, 0.03, 0.02]
    out = allocate.owl_layer_densities(shares, 0.5, 0.08)
    assert sum(out) / len(out) == pytest.approx(0.5)
    assert max(out) - min(out) == pytest.approx(0.16)
    assert sorted(range(4), key=out.__getitem__) == sorted(range(4), key=shares.__getitem__)
    assert allocate.owl_layer_densities([0.02, 0.02], 0.4, 0.08) == pytest.approx([0.4, 0.4])


def test_owl_gives_the_layer_with_outliers_more(tmp_path, tiny_prepared):
    """On a real (tiny) checkpoint: plant activation outliers in layer 1's statistics and it keeps more."""

    from glrs import modelio, stats

    pools_, files = [], []
    for layer in range(3):
        W = modelio.read_layer(str(tiny_prepared), layer)
        tensors = {}
        for short, w in W.items():
            m, n = w.shape
            pools_.append(allocate.MatrixPool(modelio.weight_name(layer, short), layer, short, (m, n),
                                              torch.zeros(0, dtype=torch.float64),
                                              torch.sort(w.reshape(-1).abs().double(), descending=True).values))
            g = stats.INPUT_OF[short]
            if g not in tensors:
                d = torch.ones(n)
                if layer == 1:
                    d[:2] = 1e4  # two outlier input features
                tensors[g] = torch.diag(d)
        path = tmp_path / f"layer_{layer}.safetensors"
        stats.write_layer(path, tensors, {})
        files.append(str(path))
    alloc = allocate.owl(pools_, 0.5, str(tiny_prepared), files)
    kept = {layer: sum(int(alloc.sparse_keep[p.name].sum()) for p in pools_ if p.layer == layer) for layer in range(3)}
    assert kept[1] > kept[0] and kept[1] > kept[2]
    info = allocate.summarise(pools_, alloc, 0.5)
    assert abs(info["achieved_density"] - 0.5) < 1e-3


def test_masks_are_stored_one_bit_a_candidate_and_read_back(tmp_path):
    """allocate.save packs the keep-masks into bits (8x less disk than a bool a weight: 7 -> 0.9 GB at 8B);
    load_masks gives the masks back exactly, and still reads a file of bools written before."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    alloc = allocate.Allocation({"a": torch.rand(13, generator=g) < 0.5, "b": torch.zeros(0, dtype=torch.bool)},
                                {"a": torch.rand(1001, generator=g) < 0.3, "b": torch.rand(8, generator=g) < 0.5})
    allocate.save(alloc, {"x": 1}, tmp_path / "a.json", tmp_path / "a.safetensors")
    back = allocate.load_masks(tmp_path / "a.safetensors")
    for mine, theirs in ((alloc.rank_keep, back.rank_keep), (alloc.sparse_keep, back.sparse_keep)):
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (tmp_path / "a.safetensors").stat().st_size < 1001 // 8 + 600
    save_file({"a.sparse_keep": alloc.sparse_keep["a"]}, str(tmp_path / "old.safetensors"))
    assert torch.equal(allocate.load_masks(tmp_path / "old.safetensors").sparse_keep["a"], alloc.sparse_keep["a"])
