"""Steps 1 and 3 end to end on tiny random models of every supported family."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import compress
from component import LowRankLinear
from tests.tiny_models import FAMILIES, save_tiny_model, tiny_model
from utils.data import calibration_windows
from utils.decompose import rank_for_ratio
from utils.io import CompressedModelError, load_compressed
from utils.model import count_parameters, decoder_layers, layer_prefix, load_all_layers, target_linears
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


def run_steps(args) -> compress.Session:
    session = compress.Session()
    compress.run_profile(args, session)
    compress.run_compress(args, session)
    load_all_layers(session.model)  # steps 1-3 to a directory stream: the session holds the output, read whole here
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
    # the statistics of step 1 are beside the model, not inside it
    assert os.path.isfile(os.path.join(save_path + ".stats", "meta.json"))
    config = json.load(open(os.path.join(save_path, "config.json")))
    block = config["compression"]
    for key in ("base_model", "method", "ratio", "ranks", "whitening", "decomposition", "calibration", "fallbacks"):
        assert key in block
    assert block["calibration"]["nsamples"] == 8 and block["calibration"]["seq_len"] == 32


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layerwise_statistics_match_a_full_forward(family, model_dirs, tmp_path):
    """The sequential walker feeds each layer exactly what the full model would."""
    args = make_args(model_dirs[family], str(tmp_path / "out"))
    session = compress.Session()
    compress.run_profile(args, session)
    model = tiny_model(family)
    windows = calibration_windows("random", None, 8, 32, 0, vocab_size=256)
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
    stats = load_file(str(tmp_path / "out.stats" / "layer_0001.safetensors"))
    meta = json.load(open(tmp_path / "out.stats" / "meta.json"))
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
                          "--stats_path", chained + ".stats", "--device", "cpu"]) == 0
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
                                     ("--decomposition", "rsvd")])
def test_variants_run_and_record_themselves(variant, model_dirs, tmp_path):
    args = make_args(model_dirs["qwen2"], str(tmp_path / "out"), *variant)
    session = run_steps(args)
    block = session.compression
    assert block[variant[0][2:]] == variant[1]
    assert block["method"] == ("svd" if variant == ("--whitening", "none") else "svd-llm")
    # every planned matrix has its own record: rank and a positive truncation loss
    assert set(block["modules"]) == set(block["ranks"])
    assert all(r["rank"] == block["ranks"][n] and r["truncation_loss"] > 0 for n, r in block["modules"].items())


def _layer_inputs_of_final_model(model, windows):
    """Gram of each target module's inputs when the (compressed) model runs the windows whole."""
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            def hook(mod, inputs, output, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for handle in handles:
        handle.remove()
    return grams


def test_closed_form_update_is_sequential_and_fits_the_compressed_stream(model_dirs, tmp_path, monkeypatch):
    """Each matrix's update is fitted on the inputs it sees in the final compressed model: q/k/v on
    the outputs of the compressed layers below, o on the updated q/k/v, down on the updated gate/up.
    Fitting every matrix of a layer at once (o on inputs from not-yet-updated q/k/v) fails this."""
    from methods import closed_form
    fitted: dict[str, torch.Tensor] = {}
    real_update = closed_form.update_u

    def recording_update(weight, u, v, gram_fit, gram_held, ridge):
        result = real_update(weight, u, v, gram_fit, gram_held, ridge)
        result.accepted = True  # take every update, so the final model is the one fitted against
        return result

    real_method = closed_form.ClosedFormUpdate._update

    def record(self, context, name, module, weight, gram_fit, gram_held):
        fitted[f"{context.name}.{name}"] = gram_fit.double().cpu()
        return real_method(self, context, name, module, weight, gram_fit, gram_held)

    monkeypatch.setattr(closed_form, "update_u", recording_update)
    monkeypatch.setattr(closed_form.ClosedFormUpdate, "_update", record)
    args = make_args(model_dirs["llama"], str(tmp_path / "out"), "--update", "closed_form",
                     "--updating_nsamples", "8", "--ratio", "0.6")
    session = run_steps(args)
    assert len(fitted) == 14
    fit_windows = compress._windows(args, session, 8)[0][:6]  # the last quarter (2 windows) is held out
    final = _layer_inputs_of_final_model(session.model, fit_windows)
    for name, gram in fitted.items():
        expected = final[name]
        assert torch.allclose(gram, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())), name


def _update_pass(fit_tokens: torch.Tensor, held_tokens: torch.Tensor, stats_tokens: torch.Tensor):
    """A tiny float64 Llama at 60% with whitening from `stats_tokens`, once decomposed only and once
    with the closed-form update fitted on 6 windows and judged on the 2 held-out ones."""
    from pipeline.steps import CompressOptions, compress_model, profile_model
    from utils.plan import Plan
    from utils.model import target_shapes
    from methods import DecomposeOptions, UpdateOptions
    original = tiny_model("llama").double()
    stats = profile_model(original, stats_tokens, "cpu", gram_dtype=torch.float64)
    plan = Plan.uniform(target_shapes(original), 0.6)
    decompose = DecomposeOptions(svd_dtype=torch.float64)
    plain, updated = tiny_model("llama").double(), tiny_model("llama").double()
    compress_model(plain, plan, CompressOptions(decompose), "cpu", stats)
    record = compress_model(updated, plan, CompressOptions(decompose, UpdateOptions(nsamples=8)), "cpu", stats,
                            torch.cat([fit_tokens, held_tokens]))
    return original, plain, updated, record


def _qkv_inputs(model, windows) -> torch.Tensor:
    """Layer 0's q/k/v input on `windows` (the normed embeddings: the same in every compressed model)."""
    sink = []
    handle = decoder_layers(model)[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: sink.append(i[0][0].detach()))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    handle.remove()
    return torch.cat(sink)


QKV = [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]


def _windows(count: int, low: int, high: int, seed: int) -> torch.Tensor:
    return torch.randint(low, high, (count, 64), generator=torch.Generator().manual_seed(seed))


def test_update_that_raises_the_held_out_error_is_not_taken(one_thread):
    """Whitening from the held-out windows makes layer 0's q/k/v factors the best rank-r ones on
    exactly the inputs the held-out windows give them: any u fitted to other windows (other tokens)
    must raise their held-out error, so q/k/v must keep their factors bit for bit."""
    from utils.update import closed_form_u
    fit, held = _windows(6, 0, 128, 1), _windows(2, 128, 256, 2)
    original, plain, updated, record = _update_pass(fit, held, stats_tokens=held)
    x_fit, x_held = _qkv_inputs(original, fit), _qkv_inputs(original, held)
    for name in QKV:  # the premise, measured here: the fitted u helps on the fit windows and hurts held out
        weight, module = original.get_submodule(name).weight.detach(), plain.get_submodule(name)
        u, v = module.u.weight.detach(), module.v.weight.detach()
        candidate, _ = closed_form_u(weight, v, x_fit.T @ x_fit)
        error = {(label, side): float(torch.linalg.norm(x @ (weight - w @ v).T) ** 2)
                 for label, w in (("u", u), ("candidate", candidate)) for side, x in (("fit", x_fit), ("held", x_held))}
        assert error["candidate", "fit"] < error["u", "fit"] and error["candidate", "held"] > error["u", "held"], error
        assert record["modules"][name]["update"]["accepted"] is False, name
        for factor in ("u", "v"):
            a, b = (m.get_submodule(f"{name}.{factor}").weight for m in (plain, updated))
            assert torch.equal(a, b), (name, factor)


def test_update_that_lowers_the_held_out_error_is_taken(one_thread):
    """Held-out windows that repeat the fit windows (fit: A B A B A B, held out: A B), whitening from
    other windows: every matrix's fitted u lowers the fit error, hence the held-out one, so all 14 are
    taken; on layer 0's q/k/v the held-out error, measured here, is lower."""
    pair = _windows(2, 0, 256, 3)
    original, plain, updated, record = _update_pass(pair.repeat(3, 1), pair, stats_tokens=_windows(4, 0, 256, 4))
    lowrank = [n for n, m in updated.named_modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 14 and record["updates_accepted"] == 14
    for name in lowrank:
        assert not torch.equal(plain.get_submodule(name).u.weight, updated.get_submodule(name).u.weight), name
        assert torch.equal(plain.get_submodule(name).v.weight, updated.get_submodule(name).v.weight), name
    x = _qkv_inputs(original, pair)
    for name in QKV:
        weight = original.get_submodule(name).weight.detach()
        before, after = (float(torch.linalg.norm(x @ (weight - m.get_submodule(name).weight_product.detach()).T) ** 2)
                         for m in (plain, updated))
        assert after < 0.99 * before, (name, before, after)


def test_step2_plan_drives_step3(model_dirs, tmp_path):
    """Step 2 writes the plan next to the statistics; step 3 finds it there by default and
    honours an edited one (null keeps a matrix dense)."""
    out = str(tmp_path / "out")
    assert compress.main(["--step", "1,2", "--model", model_dirs["llama"], "--dataset", "random",
                          "--whitening_nsamples", "4", "--model_seq_len", "16", "--save_path", out,
                          "--ratio", "0.4", "--device", "cpu"]) == 0
    plan_path = os.path.join(out + ".stats", "plan_0.4.json")
    table = json.load(open(plan_path))
    assert table["ratio"] == 0.4 and len(table["modules"]) == 14
    assert table["modules"]["model.layers.0.mlp.down_proj"] == {"shape": [64, 160], "bias": False,
                                                                "rank": rank_for_ratio(64, 160, 0.4)}
    table["modules"]["model.layers.0.self_attn.q_proj"]["rank"] = 5
    table["modules"]["model.layers.1.mlp.up_proj"]["rank"] = None
    json.dump(table, open(plan_path, "w"))
    assert compress.main(["--step", "3", "--model", model_dirs["llama"], "--save_path", out,
                          "--ratio", "0.4", "--device", "cpu"]) == 0
    model, _, block = load_compressed(out)
    assert model.get_submodule("model.layers.0.self_attn.q_proj").rank == 5
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")) is torch.nn.Linear
    assert block["dense_modules"] == ["model.layers.1.mlp.up_proj"] and len(block["ranks"]) == 13
    assert block["plan_source"] == plan_path
    # the recorded plan's arithmetic matches the model: 13 low-rank matrices, counted r (m + n)
    target = block["parameters"]["target_matrices"]
    assert target["params_before"] - target["params_after"] == (
        block["parameters"]["original"] - block["parameters"]["compressed"])
    # at another ratio the plan is not picked up: uniform ranks
    assert compress.main(["--step", "3", "--model", model_dirs["llama"], "--save_path", str(tmp_path / "o2"),
                          "--stats_path", out + ".stats", "--ratio", "0.2", "--device", "cpu"]) == 0
    assert load_compressed(str(tmp_path / "o2"))[2]["plan_source"] is None


def test_update_the_dtype_cannot_hold_is_not_taken(model_dirs, tmp_path, monkeypatch):
    """An accepted closed-form update whose u overflows the layer's dtype is refused, not cast to inf."""
    from methods import closed_form
    from utils.update import UpdateResult
    args = make_args(model_dirs["llama"], str(tmp_path / "out"), "--update", "closed_form",
                     "--updating_nsamples", "4", "--ratio", "0.6")
    monkeypatch.setattr(closed_form, "update_u", lambda w, u, v, fit, held, ridge: UpdateResult(
        torch.full_like(u, 1e39, dtype=torch.float64), True, 1.0, 0.5, 1.0, 0.5))  # 1e39 > float32 max
    session = run_steps(args)
    assert session.compression["updates_accepted"] == 0
    assert not any(r["update"]["fits_dtype"] for r in session.compression["modules"].values())
    for module in session.model.modules():
        if isinstance(module, LowRankLinear):
            assert torch.isfinite(module.u.weight).all()


def test_held_out_windows_share_no_token_with_step_1s_windows(tmp_path, monkeypatch):
    """Step 3's update draws its windows with step 1's seed, so they used to BE step 1's first 16: its
    held-out quarter (positions 12-15) measured on text the whitening statistics were made from. Now
    those are drawn apart: no held-out window shares a token with any of step 1's 32 windows (nor with
    the fit windows, which stay step 1's first 12), and the block records how they were drawn."""
    import random

    import pipeline.steps
    from scripts.sweep import make_tiny_model
    model_dir = make_tiny_model(str(tmp_path / "m"))
    text = tmp_path / "calibration.txt"
    words = random.Random(0).choices(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"], k=3000)
    text.write_text(" ".join(words))
    seen = {}
    for name in ("profile_model", "compress_model"):
        def capture(*args, _name=name, _real=getattr(pipeline.steps, name), **kwargs):
            seen[_name] = args[1] if _name == "profile_model" else args[5]
            return _real(*args, **kwargs)
        monkeypatch.setattr(pipeline.steps, name, capture)
    out = tmp_path / "out"
    assert compress.main(["--step", "1,3", "--model", model_dir, "--dataset", str(text), "--whitening_nsamples", "32",
                          "--model_seq_len", "16", "--update", "closed_form", "--updating_nsamples", "16",
                          "--save_path", str(out), "--device", "cpu"]) == 0
    step1, step3 = seen["profile_model"], seen["compress_model"]
    assert step3.shape == (16, 16) and torch.equal(step3[:12], step1[:12])  # the fit windows are step 1's
    for held in step3[12:]:
        assert not any(torch.equal(held, window) for window in step1), "a held-out window is one of step 1's"
    from utils.data import load_text, tokenize, window_starts
    from utils.model import load_tokenizer, resolve_model
    block = json.load(open(out / "config.json"))["compression"]["heldout_windows"]
    assert block["positions"] == [12, 13, 14, 15] and len(block["starts"]) == 4
    ids = tokenize(load_tokenizer(resolve_model(model_dir)), load_text(str(text), "train"))
    step1_starts = window_starts(ids.numel(), 32, 16, 0)
    assert all(torch.equal(ids[s:s + 16], w) for s, w in zip(step1_starts.tolist(), step1))
    for start, window in zip(block["starts"], step3[12:]):
        assert torch.equal(ids[start:start + 16], window)
        assert bool(((step1_starts - start).abs() >= 16).all()), f"held-out window at {start} overlaps step 1's"
