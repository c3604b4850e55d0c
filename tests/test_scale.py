"""Issue 10 (scale), CPU part: random-weight presets, Gram precision, SVD driver logic, the bench."""
from __future__ import annotations

import json
import os

import pytest
import torch

from utils import decompose, presets
from utils.decompose import (SVDInfo, checked_svd, exact_svd, low_rank_factors, rank_for_ratio,
                             resolve_svd_driver, svd_residual)
from utils.model import ModelSpecError, decoder_layers, load_model, resolve_model
from utils.stats import InputStatistics, batch_gram, pack_upper, saved_gram, unpack_upper

# shrunken widths for the real presets (test-only): same families, same head structure ratios
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=512)


@pytest.fixture
def tiny_preset(monkeypatch):
    """Registers random:tiny-llama2, the llama2-7b preset with shrunken widths and 3 layers."""
    class_name, kwargs = presets.PRESETS["llama2-7b"]
    monkeypatch.setitem(presets.PRESETS, "tiny-llama2",
                        (class_name, {**kwargs, **TINY, "num_hidden_layers": 3}))
    return "random:tiny-llama2"


# ------------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("name, model_type, hidden, mlp, layers, heads, kv, vocab", [
    ("llama2-7b", "llama", 4096, 11008, 32, 32, 32, 32000),
    ("llama3-8b", "llama", 4096, 14336, 32, 32, 8, 128256),
    ("qwen2-7b", "qwen2", 3584, 18944, 28, 28, 4, 152064),
    ("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32000),
])
def test_preset_shapes(name, model_type, hidden, mlp, layers, heads, kv, vocab):
    config = presets.preset_config(name)
    assert (config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == \
        (model_type, hidden, mlp, layers, heads, kv, vocab)
    assert config.random_weights_preset == name
    assert presets.preset_config(name, 1).num_hidden_layers == 1


def test_unknown_preset_and_bad_num_layers():
    with pytest.raises(ModelSpecError, match="random:llama2-7b"):
        resolve_model("random:gpt5")
    assert resolve_model("random:llama2-7b").spec == "random:llama2-7b"
    with pytest.raises(ValueError, match="32 decoder layers"):
        presets.preset_config("llama2-7b", 33)


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_shrunken_presets_build_and_run(name):
    model = presets.build_random_model(name, torch.float32, seed=0, num_layers=2, **TINY)
    assert len(decoder_layers(model)) == 2 and model.config.num_hidden_layers == 2
    assert not any(p.is_meta for p in model.parameters())
    logits = model(torch.randint(0, 256, (1, 12))).logits
    assert logits.shape == (1, 12, 256) and torch.isfinite(logits).all()


def test_same_seed_same_weights_other_seed_other_weights(tiny_preset):
    a = presets.build_random_model(tiny_preset, torch.float32, seed=1)
    b = presets.build_random_model(tiny_preset, torch.float32, seed=1)
    c = presets.build_random_model(tiny_preset, torch.float32, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"],
                           sc["model.layers.0.self_attn.q_proj.weight"])
    # distinct parameters get distinct draws
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"],
                           sa["model.layers.0.self_attn.k_proj.weight"])


def test_num_layers_keeps_the_first_layers_unchanged(tiny_preset):
    full = presets.build_random_model(tiny_preset, torch.float32, seed=5)
    cut, tokenizer = load_model(tiny_preset, torch.float32, seed=5, num_layers=2)
    assert tokenizer is None
    assert len(decoder_layers(full)) == 3 and len(decoder_layers(cut)) == 2
    assert cut.config.num_hidden_layers == 2
    full_state = full.state_dict()
    for key, value in cut.state_dict().items():
        assert torch.equal(value, full_state[key]), key


def test_init_rules_and_dtype(tiny_preset):
    model = presets.build_random_model(tiny_preset, torch.bfloat16, seed=0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    layer = decoder_layers(model)[0]
    assert torch.all(layer.input_layernorm.weight == 1)
    std = float(model.lm_head.weight.detach().float().std())
    assert abs(std - 0.02) < 0.002
    assert model.config.use_cache is False and not model.training


def test_rotary_tables_are_recomputed(tiny_preset):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    model = presets.build_random_model(tiny_preset, torch.float16, seed=0)
    reference = LlamaRotaryEmbedding(config=model.config)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32  # not cast to the model's dtype
    assert torch.equal(rotary.inv_freq, reference.inv_freq)
    assert torch.equal(rotary.original_inv_freq, reference.inv_freq)
    assert rotary.attention_scaling == reference.attention_scaling


def test_steps_1_and_3_end_to_end_on_cpu(tiny_preset, tmp_path):
    import compress
    from utils.io import load_compressed, read_json
    save = str(tmp_path / "out")
    rc = compress.main(["--step", "1,3", "--model", tiny_preset, "--dataset", "random", "--num_layers", "2",
                        "--whitening_nsamples", "4", "--model_seq_len", "32", "--save_path", save,
                        "--device", "cpu", "--seed", "3"])
    assert rc == 0
    config = read_json(os.path.join(save, "config.json"))
    assert config["compression"]["random_weights"] is True
    assert config["random_weights_preset"] == "tiny-llama2"
    assert config["num_hidden_layers"] == 2
    assert read_json(os.path.join(save + ".stats", "meta.json"))["model"] == tiny_preset
    assert len(config["compression"]["ranks"]) == 2 * 7
    model, tokenizer, compression = load_compressed(save)
    assert tokenizer is None and compression["random_weights"] is True
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8))).logits).all()


def test_text_dataset_needs_a_tokenizer(tiny_preset, tmp_path, capsys):
    import compress
    rc = compress.main(["--step", "1", "--model", tiny_preset, "--dataset", "pydoc", "--num_layers", "1",
                        "--whitening_nsamples", "2", "--model_seq_len", "16",
                        "--save_path", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 2 and "--dataset random" in capsys.readouterr().err


# ------------------------------------------------------------------------------- Gram precision

def _float64_gram(batches):
    return sum(b.reshape(-1, b.shape[-1]).double().T @ b.reshape(-1, b.shape[-1]).double() for b in batches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_running_gram_matches_float64(dtype):
    """Documented bound: relative Frobenius error of the running Gram <= 1e-5 (per-batch float32
    accumulation, float64 running sum), whatever the number of batches."""
    generator = torch.Generator().manual_seed(0)
    scale = torch.ones(96)
    scale[:3] = 40.0  # outlier channels, as in real LLM activations
    batches = [(torch.randn(1, 512, 96, generator=generator) * scale).to(dtype) for _ in range(16)]
    stats = InputStatistics(96, "cpu")
    for batch in batches:
        stats.add_batch(batch)
    reference = _float64_gram(batches)
    assert stats.gram.dtype == torch.float64 and stats.tokens == 16 * 512
    error = float(torch.linalg.matrix_norm(stats.gram - reference) / torch.linalg.matrix_norm(reference))
    assert error < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA out_dtype=float32 path")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_out_dtype_gram_matches_float64(dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2048, 4096, generator=generator)).to(dtype)
    gram = batch_gram(x.cuda())
    assert gram.dtype == torch.float32
    reference = _float64_gram([x]).cuda()
    error = float(torch.linalg.matrix_norm(gram.double() - reference) / torch.linalg.matrix_norm(reference))
    assert error < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the masked pack/unpack path runs off the CPU")
def test_cuda_packed_gram_matches_the_cpu_layout():
    a = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    gram = a + a.T
    packed = pack_upper(gram)
    assert torch.equal(pack_upper(gram.cuda()).cpu(), packed)
    assert torch.equal(unpack_upper(packed.cuda(), 1000).cpu(), gram)
    stats = {"s.gram_upper": packed, "s.abs_sum": torch.zeros(1000, dtype=torch.float64)}
    on_device = saved_gram(stats, "s", "cuda")
    assert on_device.is_cuda and torch.equal(on_device.cpu(), gram)


# ------------------------------------------------------------------------------------ SVD driver

def test_resolve_svd_driver():
    assert resolve_svd_driver("auto", "cpu") is None
    assert resolve_svd_driver("default", "cpu") is None
    assert resolve_svd_driver("auto", torch.device("cuda")) == "gesvda"
    assert resolve_svd_driver("default", "cuda:0") is None
    assert resolve_svd_driver("gesvda", "cuda:1") == "gesvda"
    with pytest.raises(ValueError, match="CUDA-only"):
        resolve_svd_driver("gesvda", "cpu")
    with pytest.raises(ValueError, match="unknown SVD driver"):
        resolve_svd_driver("gesvdj", "cpu")


def _spectrum_matrix(m, n, seed=0, decay=0.6, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -decay
    return ((q1 * s) @ q2.T).to(dtype)


@pytest.fixture
def fake_gesvda(monkeypatch):
    """Stands in for CUDA's gesvda on CPU: records shapes; `corrupt` spoils its result."""
    calls = {"shapes": [], "drivers": [], "corrupt": None}
    real = decompose._linalg_svd

    def fake(matrix, driver):
        calls["shapes"].append(tuple(matrix.shape))
        calls["drivers"].append(driver)
        u, s, vh = real(matrix, None)
        if driver == "gesvda" and calls["corrupt"] == "raise":
            raise RuntimeError("linalg.svd: The algorithm failed to converge")
        if driver == "gesvda" and calls["corrupt"] is not None:
            u, s, vh = calls["corrupt"](u, s, vh)
        return u, s, vh

    monkeypatch.setattr(decompose, "_linalg_svd", fake)
    return calls


@pytest.mark.parametrize("shape", [(120, 48), (48, 120)])
def test_gesvda_runs_tall_and_is_accepted(fake_gesvda, shape):
    a = _spectrum_matrix(*shape)
    info = SVDInfo()
    u, s, vh = checked_svd(a, "gesvda", info=info)
    assert fake_gesvda["shapes"] == [(120, 48)]  # tall orientation, one call, no fallback
    assert info.driver == "gesvda" and not info.fallback and info.residual < 1e-5
    assert u.shape == (shape[0], 48) and vh.shape == (48, shape[1])
    assert torch.allclose((u * s) @ vh, a, atol=1e-5)


@pytest.mark.parametrize("corrupt", [
    lambda u, s, vh: (u, s * 1.01, vh),  # wrong singular values
    lambda u, s, vh: (u + 1e-2 * torch.randn_like(u), s, vh),  # non-orthogonal U
    lambda u, s, vh: (u, torch.full_like(s, float("nan")), vh),  # NaN
    "raise",  # gesvda reports a failure
])
def test_bad_gesvda_result_falls_back_to_default(fake_gesvda, corrupt):
    a = _spectrum_matrix(80, 40)
    fake_gesvda["corrupt"] = corrupt
    info = SVDInfo()
    u, s, vh = checked_svd(a, "gesvda", info=info)
    assert fake_gesvda["drivers"] == ["gesvda", None]
    assert info.fallback and info.driver == "default" and info.residual > decompose.GESVDA_RTOL[torch.float32]
    reference = torch.linalg.svd(a, full_matrices=False)
    assert torch.equal(s, reference.S)


def test_cpu_exact_svd_is_unchanged():
    a = _spectrum_matrix(70, 50)
    rank = 20
    u, s, vh = exact_svd(a, rank)
    ref_u, ref_s, ref_vh = torch.linalg.svd(a, full_matrices=False)
    assert torch.equal(u, ref_u[:, :rank]) and torch.equal(s, ref_s[:rank]) and torch.equal(vh, ref_vh[:rank])
    factors = low_rank_factors(a, rank)
    assert factors.svd.driver == "default" and not factors.svd.fallback


def test_svd_residual_scale():
    a = _spectrum_matrix(100, 60)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    assert svd_residual(a, u, s, vh) < 1e-5
    assert svd_residual(a, u, s * 1.001, vh) > 1e-4


def _gram_based_svd(matrix):
    """An SVD from the eigenvectors of A^T A in float32 (how a Gram-based driver like gesvda loses
    accuracy): fine for large singular values, its trailing vectors lose orthogonality."""
    eigenvalues, v = torch.linalg.eigh(matrix.T @ matrix)
    eigenvalues, v = eigenvalues.flip(0), v.flip(1)
    sigma = eigenvalues.clamp_min(0).sqrt()
    return (matrix @ v) / sigma.clamp_min(1e-30), sigma, v.T


@pytest.mark.parametrize("decay, accepted", [(0.6, True), (1.0, True), (1.5, False), (2.0, False)])
def test_residual_judges_the_kept_rank_not_the_discarded_vectors(monkeypatch, decay, accepted):
    """The gesvda check asks whether the rank-r truncation is as good as its singular values
    promise: a Gram-based SVD passes on a moderately ill-conditioned matrix (its trailing vectors
    are off, which truncation discards) and is rejected where the truncation itself suffers."""
    def fake(matrix, driver):
        return _gram_based_svd(matrix) if driver == "gesvda" else torch.linalg.svd(matrix, full_matrices=False)

    monkeypatch.setattr(decompose, "_linalg_svd", fake)
    a = _spectrum_matrix(1024, 1024, decay=decay)
    rank = rank_for_ratio(1024, 1024, 0.2)
    info = SVDInfo()
    u, s, vh = checked_svd(a, "gesvda", info=info, rank=rank)
    assert (info.driver == "gesvda") == accepted and info.fallback == (not accepted)
    s64 = torch.linalg.svdvals(a.double())
    optimum = float(s64[rank:].square().sum().sqrt())
    error = float(torch.linalg.matrix_norm(a.double() - (u[:, :rank].double() * s[:rank].double()) @ vh[:rank].double()))
    # within rtol ||A||_F of the optimum (whichever driver was used; see svd_residual for why)
    assert error - optimum <= 1.01 * decompose.GESVDA_RTOL[torch.float32] * float(torch.linalg.matrix_norm(a.double()))
    if accepted and decay == 1.0:  # its vectors past the kept rank are far from orthonormal
        u_tail = u[:, rank:].double()
        assert float(torch.linalg.matrix_norm(u_tail.T @ u_tail - torch.eye(1024 - rank, dtype=torch.float64))) > 1e-3


def test_exact_svd_checks_gesvda_at_the_rank_it_keeps(fake_gesvda, monkeypatch):
    seen = []
    real = decompose.svd_residual
    monkeypatch.setattr(decompose, "resolve_svd_driver", lambda driver, device: "gesvda")
    monkeypatch.setattr(decompose, "svd_residual", lambda *args, **kwargs: seen.append(args[4]) or real(*args))
    a = _spectrum_matrix(90, 60)
    u, s, vh = exact_svd(a, 17, "auto")
    assert seen == [17] and u.shape == (90, 17)


def test_residual_rejects_singular_values_out_of_order_or_negative():
    a = _spectrum_matrix(60, 40)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    assert svd_residual(a, u, s, vh, 10) < 1e-5
    order = list(range(40))
    order[9], order[10] = 10, 9  # the kept set misses triplet 10 and keeps 11 instead
    assert svd_residual(a, u[:, order], s[order], vh[order], 10) == float("inf")
    assert svd_residual(a, u, -s, vh, 10) == float("inf")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gesvda is CUDA-only")
def test_gesvda_is_used_on_a_well_conditioned_matrix():
    a = _spectrum_matrix(2048, 1024, decay=0.6).cuda()
    info = SVDInfo()
    exact_svd(a, rank_for_ratio(2048, 1024, 0.2), "auto", info)
    assert info.driver == "gesvda" and not info.fallback and info.residual < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="gesvda is CUDA-only")
@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (1024, 1024)])
def test_gesvda_truncation_error_matches_float64(shape):
    a = _spectrum_matrix(*shape, decay=1.0).cuda()
    rank = rank_for_ratio(*shape, 0.2)
    info = SVDInfo()
    u, s, vh = exact_svd(a, rank, "auto", info)
    s64 = torch.linalg.svdvals(a.double())
    optimum = float(s64[rank:].square().sum().sqrt())
    error = float(torch.linalg.matrix_norm(a.double() - (u.double() * s.double()) @ vh.double()))
    # gesvda accepted or not, the truncation is within the check's tolerance of the optimum
    # (a fallback is allowed here: s_i = i^-1 is where a Gram-based driver starts to lose accuracy)
    assert error - optimum <= 1.01 * decompose.GESVDA_RTOL[torch.float32] * float(torch.linalg.matrix_norm(a.double()))
    assert error / optimum - 1 < 2e-3


# ------------------------------------------------------------------------------------- benchmark

@pytest.fixture
def bench():
    """scripts/bench_scale.py as a module."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_scale.py")
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scale_smoke(bench, tiny_preset, tmp_path):
    out = str(tmp_path / "bench.json")
    result = bench.main(["--model", tiny_preset, "--device", "cpu", "--dtype", "float32", "--nsamples", "2",
                         "--seq_len", "16", "--num_layers", "2", "--check_matrices", "3", "--out", out])
    saved = json.load(open(out))
    assert saved == json.loads(json.dumps(result))
    assert saved["random_weights"] is True
    for key in ("forward_s", "profile_s", "decompose_s", "stats_wait_s", "total_s", "peak_rss_gib"):
        assert saved["results"][key] >= 0
    checks = saved["truncation_check"]["matrices"]
    assert len(checks) == 3
    assert all(c["excess_vs_float64"] < 1e-3 for c in checks)
    assert saved["partial"] is False


def test_bench_scale_keeps_finished_stages_when_stopped(bench, tiny_preset, tmp_path, monkeypatch):
    """A run killed in step 3 (a device time limit) still leaves the stages it finished."""
    from pipeline import steps as pipeline

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of step 3; a SIGTERM kills at once, same file left

    monkeypatch.setattr(pipeline, "compress_model", stopped)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--model", tiny_preset, "--device", "cpu", "--dtype", "float32", "--nsamples", "2",
                    "--seq_len", "16", "--num_layers", "1", "--check_matrices", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and saved["completed_stages"] == ["load", "warmup", "forward", "profile", "check"]
    assert saved["stages"]["profile"]["seconds"] > 0 and saved["breakdown"]["profile"]["gram products"]["calls"] > 0
    assert not list(tmp_path.glob("*.partial-write"))


def test_bench_scale_keeps_the_decomposition_when_stopped_in_the_save(bench, tiny_preset, tmp_path, monkeypatch):
    from utils import io

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "save_compressed", stopped)  # bench_scale saves with utils.io.save_compressed
    out = tmp_path / "bench.json"
    for timers in ([], ["--no_breakdown"]):
        with pytest.raises(KeyboardInterrupt):
            bench.main(["--model", tiny_preset, "--device", "cpu", "--dtype", "float32", "--nsamples", "2",
                        "--seq_len", "16", "--num_layers", "1", "--check_matrices", "0", "--out", str(out)] + timers)
        saved = json.loads(out.read_text())
        assert saved["partial"] is True and saved["session_timings"]["compress_s"] > 0
        if not timers:
            assert saved["breakdown"]["decompose"]["low_rank_factors (W S, SVD, solve)"]["calls"] == 7


# ------------------------------------------------------------------------------ layer moves

def test_read_only_walk_puts_the_original_tensors_back():
    from tests.tiny_models import tiny_model
    from utils.layerwise import walk_layers
    from utils.model import copies_to
    model = tiny_model("gemma3")  # q/k norms and per-layer-type attention
    layer = decoder_layers(model)[0]
    before = {name: (t.data_ptr(), t.clone()) for name, t in
              list(layer.named_parameters()) + list(layer.named_buffers())}
    # meta: a device that is not the CPU, on any machine; float64: any other conversion
    for target, moved in (("meta", lambda p: p.device.type == "meta"), (torch.float64, lambda p: p.dtype == torch.float64)):
        restore = copies_to(layer, target)
        assert all(moved(p) for p in layer.parameters())
        restore()
        after = dict(list(layer.named_parameters()) + list(layer.named_buffers()))
        assert set(after) == set(before)
        for name, (pointer, value) in before.items():
            assert after[name].device.type == "cpu" and after[name].data_ptr() == pointer
            assert torch.equal(after[name], value)
    # the read-only walk computes what the copying walk computes
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for changes in (True, False):
        seen = []
        walk_layers(model, windows, "cpu", lambda c: seen.append(c.run()) or seen[-1], "t",
                    changes_weights=changes)
        outputs[changes] = seen
    assert all(torch.equal(a, b) for a, b in zip(outputs[True], outputs[False]))


def test_non_layer_modules_go_back_without_a_copy_tied_embedding_included():
    from tests.tiny_models import tiny_model
    from utils.model import non_layer_modules_to
    model = tiny_model("llama")  # lm_head is tied to the input embedding
    assert model.lm_head.weight is model.get_input_embeddings().weight
    layer_params = {id(p) for p in decoder_layers(model).parameters()}
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    restore = non_layer_modules_to(model, "meta")
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still one tensor on the device
    moved = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    assert moved and all(id(p) not in layer_params for name, p in model.named_parameters() if name in moved)
    restore()
    assert all(p.device.type == "cpu" and p.data_ptr() == before[name] for name, p in model.named_parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="layer moves to a GPU")
def test_read_only_walk_on_cuda_leaves_the_model_on_the_cpu_untouched():
    from tests.tiny_models import tiny_model
    from utils.layerwise import walk_layers
    model = tiny_model("llama")
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    devices = []
    walk_layers(model, windows, "cuda", lambda c: devices.append(
        next(c.layer.parameters()).device.type) or c.run(), "t", changes_weights=False)
    assert devices == ["cuda"] * len(decoder_layers(model))
    assert all(p.device.type == "cpu" and p.data_ptr() == pointers[name] for name, p in model.named_parameters())
