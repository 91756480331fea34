"""Every architecture glrs claims (modelio.SUPPORTED_TYPES), built as a tiny random model with the real
tokenizer and taken through the whole CAP path: prepare -> activation statistics -> Stage 2 (cap, budget
policy) -> realise -> materialise -> glrs.load -> logits. Each config turns on what makes it differ from
Llama: untied head and sliding-window attention (mistral), q/k/v biases and mixed sliding/full layers
(qwen2), q/k norms and head_dim * heads != hidden (qwen3), and for gemma3_text all of these plus its
scaled embedding, four norms a layer, its per-layer-type rotary tables and a final logit soft-cap."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from glrs import modelio

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 24  # longer than every sliding window below, so the windows change the result
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.2)


def _config(arch: str, vocab: int):
    import transformers as T

    c = dict(COMMON, vocab_size=vocab)
    if arch == "llama":
        return T.LlamaConfig(**c, tie_word_embeddings=True), T.LlamaForCausalLM
    if arch == "mistral":
        return T.MistralConfig(**c, sliding_window=8, tie_word_embeddings=False), T.MistralForCausalLM
    if arch == "qwen2":
        return T.Qwen2Config(**c, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                             tie_word_embeddings=True), T.Qwen2ForCausalLM
    if arch == "qwen3":
        return T.Qwen3Config(**c, head_dim=16, tie_word_embeddings=True), T.Qwen3ForCausalLM
    if arch == "gemma3_text":
        return T.Gemma3TextConfig(**c, head_dim=16, sliding_window=8, final_logit_softcapping=5.0,
                                  layer_types=["sliding_attention", "full_attention"],
                                  tie_word_embeddings=True), T.Gemma3ForCausalLM
    raise AssertionError(arch)


# What each architecture has besides the seven targets, and what must survive compression as it is.
EXTRA = {
    "llama": [],
    "mistral": ["lm_head.weight"],
    "qwen2": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "qwen3": ["self_attn.q_norm.weight", "self_attn.k_norm.weight"],
    "gemma3_text": ["self_attn.q_norm.weight", "self_attn.k_norm.weight", "pre_feedforward_layernorm.weight",
                    "post_feedforward_layernorm.weight"],
}


def test_every_claimed_architecture_is_tested():
    assert set(EXTRA) == set(modelio.SUPPORTED_TYPES)


@pytest.fixture(scope="module", params=modelio.SUPPORTED_TYPES)
def arch_model(request, tmp_path_factory, real_tokenizer_dir):
    """(arch, source dir, prepared dir, calibration ids) of a tiny random model of the architecture."""
    from transformers import AutoTokenizer

    arch = request.param
    root = tmp_path_factory.mktemp(f"arch-{arch}")
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    config, cls = _config(arch, len(tokenizer))
    torch.manual_seed(0)
    model = cls(config)
    # Random non-trivial values for what the initialiser leaves at 0 or 1 (biases, norms), so that losing
    # or moving them shows in the logits and in the tensor comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(0.5 * torch.randn_like(p) + (0.0 if arch == "gemma3_text" or name.endswith("bias") else 1.0))
    src = root / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    prepared = root / "prepared"
    modelio.prepare_model(str(src), prepared)
    ids = torch.randint(0, len(tokenizer), (4, SEQ), generator=torch.Generator().manual_seed(1))
    return arch, src, prepared, ids


def _dense(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_prepare_keeps_the_architecture(arch_model):
    arch, src, prepared, _ = arch_model
    manifest = modelio.read_manifest(prepared)
    assert manifest["model_type"] == arch and manifest["num_layers"] == 2
    model = _dense(prepared)
    assert manifest["targets"] == {s: list(model.get_submodule(f"model.layers.0.{p}").weight.shape)
                                   for s, p in modelio.TARGETS.items()}
    for layer in range(2):
        weights = modelio.read_layer(prepared, layer)
        for short, W in weights.items():
            assert torch.equal(W, model.get_submodule(f"model.layers.{layer}.{modelio.TARGETS[short]}").weight)
    if arch in ("qwen3", "gemma3_text"):  # head_dim * heads (64) != hidden (32): q is 64 x 32, o 32 x 64
        assert manifest["targets"]["q"] == [64, 32] and manifest["targets"]["o"] == [32, 64]


def test_activation_statistics_match_a_plain_forward(arch_model, tmp_path):
    """glrs.stats runs the layers one at a time from captured per-layer arguments (masks, rotary tables);
    its H must be what hooks on the whole model's ordinary forward see, for sliding and full layers alike."""
    from glrs import stats

    arch, _, prepared, ids = arch_model
    stats.collect(str(prepared), ids, [0, 1], str(tmp_path))
    model = _dense(prepared)
    acc: dict[str, torch.Tensor] = {}
    handles = []
    for layer in range(2):
        for short, path in modelio.TARGETS.items():
            def hook(_m, args, key=f"{layer}.{short}"):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                acc[key] = acc.get(key, 0) + x.T @ x
            handles.append(model.get_submodule(f"model.layers.{layer}.{path}").register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    for layer in range(2):
        H = stats.read_layer(stats.layer_file(tmp_path, layer))
        for short in modelio.TARGETS:
            want = acc[f"{layer}.{short}"] / ids.numel()
            assert torch.allclose(H[short], want, rtol=1e-4, atol=1e-6 * want.abs().max()), (arch, layer, short)


def test_stage2_surrogate_with_everything_kept_is_the_dense_loss(arch_model):
    """CAP's Stage-2 engine swaps target weights in and out of the modules layer by layer and computes the
    loss from the model's hidden states (glrs.cap.loss): with every entry kept it is the model's own loss."""
    from glrs.cap import budget as cap_budget

    arch, _, prepared, ids = arch_model
    model = _dense(prepared)
    with torch.no_grad():
        dense = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    names = [modelio.weight_name(i, s) for i in range(2) for s in modelio.TARGETS]
    mods = [model.get_submodule(n.removesuffix(".weight")) for n in names]
    full = [m.weight.numel() for m in mods]
    eng = cap_budget.PrunedSurrogate(model, mods, [int(n.split(".")[2]) for n in names],
                                     [torch.ones(m.weight.shape[1]) for m in mods], torch.device("cpu"), torch.float32)
    try:
        assert math.isclose(eng.loss(ids, full), dense, rel_tol=1e-5), arch
        assert not math.isclose(eng.loss(ids, [f // 4 for f in full]), dense, rel_tol=1e-3)
    finally:
        eng.close()


def test_cap_compressed_model_loads_and_computes_its_composed_weights(arch_model, tmp_path):
    """The whole default CAP path at density 0.5; the loaded compressed model's logits equal those of a dense
    model of the same architecture carrying the composed weights, differ from the original's, and every
    non-target tensor (biases, q/k norms, norms, embedding, untied head) comes back unchanged."""
    import glrs
    from glrs import pipeline, realise, stats
    from glrs.compressed import LowRankSparseLinear
    from glrs.stage1 import Stage1

    arch, _, prepared, ids = arch_model
    layers = [0, 1]
    calib = tmp_path / "calib.safetensors"
    save_file({"input_ids": ids.contiguous()}, str(calib))
    pipeline.collect_activations(str(prepared), str(calib), layers, str(tmp_path / "stats"), "cpu")
    stats_files = [str(stats.layer_file(tmp_path / "stats", i)) for i in layers]
    info = pipeline.run_allocator(Stage1.from_weights(prepared, layers), "cap", 0.5, {"max_steps": 2}, 0, str(prepared),
                                  str(calib), str(tmp_path / "a.json"), str(tmp_path / "a.safetensors"), "cpu",
                                  stats_files)
    assert info["stage2"]["policy"] == "budget" and info["stage2"]["steps"] == 2
    assert abs(info["achieved_density"] - 0.5) < 1e-3
    files = []
    for layer, sf in zip(layers, stats_files):
        files.append(str(tmp_path / f"realised_{layer}.safetensors"))
        realise.realise_layer(str(prepared), sf, str(tmp_path / "a.json"), layer, {}, files[-1])
    pipeline.materialise_realised(str(prepared), files, str(tmp_path / "a.json"), {"method": "cap"}, str(tmp_path / "c"))

    compressed = glrs.load(tmp_path / "c")
    assert compressed.config.model_type == arch
    original = _dense(prepared)
    composed = _dense(prepared)
    kept = 0
    with torch.no_grad():
        for layer in layers:
            for path in modelio.TARGETS.values():
                mod = compressed.get_submodule(f"model.layers.{layer}.{path}")
                assert isinstance(mod, LowRankSparseLinear), (arch, layer, path)
                W = mod.dense_weight()
                kept += mod.U.numel() + mod.V.numel() + mod.values.numel()
                composed.get_submodule(f"model.layers.{layer}.{path}").weight.copy_(W)
        x = ids[:2]
        got = compressed(input_ids=x).logits
        want = composed(input_ids=x).logits
        before = original(input_ids=x).logits
    assert kept == info["params_kept"]
    scale = want.abs().max()
    assert (got - want).abs().max() < 1e-4 * scale, (arch, (got - want).abs().max())
    assert (before - want).abs().max() > 1e-2 * scale  # compression changed the model: the comparison means something
    if arch == "gemma3_text":  # the soft-cap bounds the logits, so the comparison runs through it
        assert got.abs().max() <= compressed.config.final_logit_softcapping

    # non-target tensors: present in the compressed model and bit-equal to the prepared model's
    targets = {modelio.weight_name(i, s) for i in layers for s in modelio.TARGETS}
    state = compressed.state_dict()
    for name, t in original.state_dict().items():
        if name in targets:
            continue
        assert name in state and torch.equal(state[name], t), (arch, name)
    for layer in layers:
        for extra in EXTRA[arch]:
            if not extra.startswith("lm_head"):
                name = f"model.layers.{layer}.{extra}"
                assert name in state and torch.equal(state[name], original.state_dict()[name]), (arch, name)
    if compressed.config.tie_word_embeddings:
        assert compressed.lm_head.weight is compressed.model.embed_tokens.weight
    else:
        assert torch.equal(compressed.lm_head.weight, original.lm_head.weight)
        assert not torch.equal(compressed.lm_head.weight, compressed.model.embed_tokens.weight)


def test_paper_policy_engine_runs_on_the_architecture(arch_model, tmp_path):
    """The paper's per-entry policy (glrs/cap/candidates.py's engine composes each layer's sampled weights
    into the modules while that layer runs) on the architecture: one step, the exact budget."""
    from glrs import pipeline, stats
    from glrs.stage1 import Stage1

    arch, _, prepared, ids = arch_model
    calib = tmp_path / "calib.safetensors"
    save_file({"input_ids": ids.contiguous()}, str(calib))
    stats.collect(str(prepared), ids, [0, 1], str(tmp_path / "stats"))
    info = pipeline.run_allocator(Stage1.from_weights(prepared, [0, 1]), "cap", 0.5,
                                  {"policy": "entry", "max_steps": 1, "samples_per_step": 2, "baseline": "loo"}, 0,
                                  str(prepared), str(calib), str(tmp_path / "a.json"), str(tmp_path / "a.safetensors"),
                                  "cpu", [str(stats.layer_file(tmp_path / "stats", i)) for i in (0, 1)])
    assert info["stage2"]["steps"] == 1 and math.isfinite(info["stage2"]["expected_density"]), info["stage2"]
    assert abs(info["achieved_density"] - 0.5) < 1e-3


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "oats"])
def test_layer_sequential_baselines_run_on_the_architecture(arch_model, method):
    """The baselines run the decoder layers one at a time on captured inputs (rotary tables, masks per layer
    type): on every architecture each must keep its budget, change only the targets and leave a model whose
    loss on the calibration ids stays finite and near the dense loss."""
    from glrs.methods import get_method

    arch, _, prepared, ids = arch_model
    model = _dense(prepared)
    with torch.no_grad():
        dense_loss = float(model(input_ids=ids, labels=ids).loss)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {"iterations": 3} if method == "oats" else {}
    out = get_method(method).compress(model, ids, 0.5, params, 0, "cpu")
    total = sum(W.numel() for W in out.weights.values())
    assert abs(sum(out.params_kept.values()) / total - 0.5) <= 1e-3, arch
    for key, value in model.state_dict().items():
        if key not in out.weights:
            assert torch.equal(value, before[key]), (arch, key)
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert math.isfinite(loss) and loss < dense_loss + 1.0, (arch, dense_loss, loss)
