"""Steps 1 and 3 end to end on tiny random models of every supported family."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import compress
from component import LowRankLinear
from tests.tiny_models import FAMILIES, save_tiny_model, tiny_model
from utils import pipeline
from utils.decompose import rank_for_ratio
from utils.io import CompressedModelError, load_compressed
from utils.model import count_parameters, decoder_layers, layer_prefix, target_linears
from utils.stats import pack_upper, saved_gram, unpack_upper

EXPECTED_LINEARS = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
}
EXPECTED_LINEARS["mistral"] = EXPECTED_LINEARS["qwen2"] = EXPECTED_LINEARS["gemma3"] = EXPECTED_LINEARS["llama"]


def make_args(model_dir: str, save_path: str, *extra: str):
    argv = ["--step", "1-3", "--model", model_dir, "--dataset", "random", "--whitening_nsamples", "8",
            "--model_seq_len", "32", "--save_path", save_path, "--device", "cpu", *extra]
    args = compress.build_parser().parse_args(argv)
    compress.validate(args)
    return args


def run_steps(args) -> pipeline.Session:
    session = pipeline.Session()
    pipeline.profile(args, session)
    pipeline.compress(args, session)
    return session


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    return {family: save_tiny_model(family, str(directory)) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_target_linears_found_from_structure(family):
    model = tiny_model(family)
    layers = decoder_layers(model)
    assert len(layers) == 2
    assert set(target_linears(layers[0])) == EXPECTED_LINEARS[family]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.2, 0.6])
def test_compress_ranks_params_and_reload(family, ratio, model_dirs, tmp_path):
    save_path = str(tmp_path / "out")
    args = make_args(model_dirs[family], save_path, "--ratio", str(ratio))
    original = tiny_model(family)
    params_before = count_parameters(original)
    session = run_steps(args)
    model = session.model
    # every target linear is low-rank with the formula's rank
    prefix = layer_prefix(original)
    expected_params = params_before
    for index, layer in enumerate(decoder_layers(original)):
        for name, linear in target_linears(layer).items():
            m, n = linear.out_features, linear.in_features
            rank = rank_for_ratio(m, n, ratio)
            module = model.get_submodule(f"{prefix}.{index}.{name}")
            assert isinstance(module, LowRankLinear) and module.rank == rank
            assert module.v.weight.shape == (rank, n) and module.u.weight.shape == (m, rank)
            assert (module.u.bias is None) == (linear.bias is None)
            assert session.compression["ranks"][f"{prefix}.{index}.{name}"] == rank
            expected_params += rank * (m + n) - m * n
    assert count_parameters(model) == expected_params
    assert session.compression["parameters"]["compressed"] == expected_params
    assert session.compression["parameters"]["original"] == params_before
    # save -> load gives identical logits
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    loaded, _, compression = load_compressed(save_path)
    assert compression["ranks"] == session.compression["ranks"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # the statistics of step 1 survive step 3 writing into the same directory
    assert os.path.isfile(os.path.join(save_path, "stats", "meta.json"))
    config = json.load(open(os.path.join(save_path, "config.json")))
    block = config["compression"]
    for key in ("base_model", "method", "ratio", "ranks", "whitening", "decomposition", "calibration", "fallbacks"):
        assert key in block
    assert block["calibration"]["nsamples"] == 8 and block["calibration"]["seq_len"] == 32


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layerwise_statistics_match_a_full_forward(family, model_dirs, tmp_path):
    """The sequential walker feeds each layer exactly what the full model would."""
    args = make_args(model_dirs[family], str(tmp_path / "out"))
    session = pipeline.Session()
    pipeline.profile(args, session)
    model = tiny_model(family)
    windows = pipeline.calibration_windows("random", None, 8, 32, 0, vocab_size=256)
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    layer = decoder_layers(model)[1]
    handles = [m.register_forward_hook(hook(n)) for n, m in target_linears(layer).items()]
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for h in handles:
        h.remove()
    stats = load_file(str(tmp_path / "out" / "stats" / "layer_0001.safetensors"))
    meta = json.load(open(tmp_path / "out" / "stats" / "meta.json"))
    streams = meta["streams"]["1"]
    assert len(set(streams.values())) == 4  # q/k/v share one Gram, gate/up share one
    for name, gram in grams.items():
        assert stats[f"{streams[name]}.gram_upper"].dim() == 1  # only the upper triangle is stored
        saved = saved_gram(stats, streams[name])
        assert saved.dtype == torch.float32  # stored in float32, summed in float64
        saved = saved.double()
        assert torch.allclose(saved, gram, rtol=1e-4, atol=1e-4 * float(gram.abs().max()))
    assert int(stats[f"{streams['self_attn.q_proj']}.tokens"][0]) == 8 * 32


def test_packed_gram_round_trip_and_the_full_layout_of_earlier_versions():
    a = torch.randn(37, 37, generator=torch.Generator().manual_seed(0))
    gram = a + a.T  # exactly symmetric
    packed = pack_upper(gram)
    assert packed.shape == (37 * 38 // 2,)
    assert torch.equal(unpack_upper(packed, 37), gram)
    # the CPU row-copy path keeps the masked (accelerator) path's order, for any mirror block
    assert torch.equal(packed, torch.masked_select(gram, torch.ones(37, 37, dtype=torch.bool).triu()))
    for block in (1, 8, 36, 37, 64):
        for method in ("rows", "masked"):  # masked: the accelerator path, one kernel per block of rows
            assert torch.equal(pack_upper(gram, block=block, method=method), packed)
            assert torch.equal(unpack_upper(packed, 37, block=block, method=method), gram)
    abs_sum = torch.zeros(37, dtype=torch.float64)
    assert torch.equal(saved_gram({"s.gram_upper": packed, "s.abs_sum": abs_sum}, "s"), gram)
    assert torch.equal(saved_gram({"s.gram": gram, "s.abs_sum": abs_sum}, "s"), gram)  # earlier layout
    with pytest.raises(ValueError, match="packed"):
        unpack_upper(packed[:-1], 37)
    with pytest.raises(KeyError, match="no Gram"):
        saved_gram({"t.abs_sum": abs_sum}, "s")


def test_step3_alone_reads_statistics_and_matches_chained_run(model_dirs, tmp_path):
    chained = str(tmp_path / "chained")
    session = run_steps(make_args(model_dirs["llama"], chained))
    assert compress.main(["--step", "3", "--model", model_dirs["llama"], "--save_path", str(tmp_path / "alone"),
                          "--stats_path", os.path.join(chained, "stats"), "--device", "cpu"]) == 0
    alone, _, _ = load_compressed(str(tmp_path / "alone"))
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(alone(ids).logits, session.model(ids).logits)


def test_single_file_pt_loads_with_weights_only(model_dirs, tmp_path):
    save_path = str(tmp_path / "model.pt")
    session = run_steps(make_args(model_dirs["llama"], save_path))
    blob = torch.load(save_path, weights_only=True)
    assert set(blob) == {"format_version", "config", "compression", "state_dict"}
    loaded, tokenizer, compression = load_compressed(save_path)
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, session.model(ids).logits)
    assert os.path.isfile(str(tmp_path / "model.stats" / "meta.json"))


@pytest.mark.parametrize("variant", [("--whitening", "eigen"), ("--whitening", "none"),
                                     ("--decomposition", "rsvd"), ("--update", "closed_form")])
def test_variants_run_and_record_themselves(variant, model_dirs, tmp_path):
    args = make_args(model_dirs["qwen2"], str(tmp_path / "out"), *variant, "--updating_nsamples", "4")
    session = run_steps(args)
    block = session.compression
    assert block[variant[0][2:]] == variant[1]
    assert block["method"] == ("svd" if variant == ("--whitening", "none") else "svd-llm")
    if variant[0] == "--update":
        assert block["updating_nsamples"] == 4
        assert 0 <= block["updates_accepted"] <= 14


def test_closed_form_update_lowers_layer_error(model_dirs, tmp_path):
    """With the update, the compressed layers' recorded fit errors never go up."""
    args = make_args(model_dirs["llama"], str(tmp_path / "out"), "--update", "closed_form",
                     "--updating_nsamples", "8", "--ratio", "0.6")
    session = pipeline.Session()
    pipeline.profile(args, session)
    report = {}
    original_print = pipeline._print_summary
    pipeline._print_summary = lambda c, t, r: report.update(r)
    try:
        pipeline.compress(args, session)
    finally:
        pipeline._print_summary = original_print
    assert len(report["update"]) == 14
    for entry in report["update"].values():
        before, after = entry["fit_error"]
        if entry["accepted"]:
            assert after <= before
            assert entry["holdout_error"][1] < entry["holdout_error"][0]


def test_step2_ranks_file_drives_step3(model_dirs, tmp_path):
    """Step 2 writes per-matrix ranks; step 3 honours an edited file (None keeps a matrix dense)."""
    out = str(tmp_path / "out")
    ranks_path = str(tmp_path / "ranks.json")
    assert compress.main(["--step", "1,2", "--model", model_dirs["llama"], "--dataset", "random",
                          "--whitening_nsamples", "4", "--model_seq_len", "16", "--save_path", out,
                          "--ranks_path", ranks_path, "--ratio", "0.4", "--device", "cpu"]) == 0
    table = json.load(open(ranks_path))
    assert table["ratio"] == 0.4 and len(table["ranks"]) == 14
    assert table["ranks"]["model.layers.0.mlp.down_proj"] == rank_for_ratio(64, 160, 0.4)
    table["ranks"]["model.layers.0.self_attn.q_proj"] = 5
    table["ranks"]["model.layers.1.mlp.up_proj"] = None
    json.dump(table, open(ranks_path, "w"))
    assert compress.main(["--step", "3", "--model", model_dirs["llama"], "--save_path", out,
                          "--ranks_path", ranks_path, "--device", "cpu"]) == 0
    model, _, block = load_compressed(out)
    assert model.get_submodule("model.layers.0.self_attn.q_proj").rank == 5
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")) is torch.nn.Linear
    assert block["dense_modules"] == ["model.layers.1.mlp.up_proj"] and len(block["ranks"]) == 13


def test_update_the_dtype_cannot_hold_is_not_taken(model_dirs, tmp_path, monkeypatch):
    """An accepted closed-form update whose u overflows the layer's dtype is refused, not cast to inf."""
    from utils.update import UpdateResult
    args = make_args(model_dirs["llama"], str(tmp_path / "out"), "--update", "closed_form",
                     "--updating_nsamples", "4", "--ratio", "0.6")
    monkeypatch.setattr(pipeline, "update_u", lambda w, u, v, fit, held: UpdateResult(
        torch.full_like(u, 1e39, dtype=torch.float64), True, 1.0, 0.5, 1.0, 0.5))  # 1e39 > float32 max
    monkeypatch.setattr(pipeline, "_print_summary", lambda *a: None)
    session = run_steps(args)
    assert session.compression["updates_accepted"] == 0
    for module in session.model.modules():
        if isinstance(module, LowRankLinear):
            assert torch.isfinite(module.u.weight).all()
