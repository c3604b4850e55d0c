"""The foundation of the methods: plan validation, the two-stream walk, the recorded losses,
decomposition variants against each other, dtype round trips, and what the CLI refuses."""
import json
import os

import pytest
import torch

import compress
from component import LowRankLinear
from methods import DecomposeOptions, UpdateOptions
from tests.reference import hand_ppl, hand_text_ppl
from tests.tiny_models import save_tiny_model, tiny_model
from utils.data import load_text
from utils.io import load_compressed
from utils.layerwise import walk_layers
from utils.model import decoder_layers, target_shapes
from pipeline.steps import CompressOptions, PipelineError, compress_model, profile_model
from utils.plan import Plan, PlanError, largest_useful_rank

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))  # 256 tokens > 160 wide


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("models")))


def _module_inputs(model, windows, names):
    """Each named module's inputs (tokens x in, float64) when `model` runs the windows whole."""
    inputs = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: inputs[n].append(i[0].reshape(-1, i[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for handle in handles:
        handle.remove()
    return {n: torch.cat(x) for n, x in inputs.items()}


# ------------------------------------------------------------------------------------------ plan

def test_plan_budget_arithmetic():
    shapes = {"a": (64, 160, False), "b": (32, 64, True)}
    plan = Plan.uniform(shapes, 0.4)
    ra, rb = plan.modules["a"].rank, plan.modules["b"].rank
    assert ra == int(64 * 160 * 0.6 // 224) and rb == int(32 * 64 * 0.6 // 96)
    assert plan.params_before() == 64 * 160 + 32 * 64 + 32
    assert plan.params_after() == ra * 224 + rb * 96 + 32
    assert plan.model_removed_fraction(100_000) == pytest.approx((plan.params_before() - plan.params_after()) / 1e5)
    assert 0.4 <= plan.removed_fraction() < 0.42  # ranks round down: never less removed than asked
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.modules == plan.modules and again.ratio == 0.4


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update({"model.layers.9.mlp.up_proj": {"shape": [160, 64], "rank": 4}}), "model.layers.9.mlp.up_proj"),
    (lambda d: d.pop("model.layers.1.mlp.down_proj"), "no entry for module 'model.layers.1.mlp.down_proj'"),
    (lambda d: d["model.layers.0.self_attn.q_proj"].update(rank=0), "q_proj has rank 0"),
    (lambda d: d["model.layers.0.self_attn.k_proj"].update(rank=33), "above min"),
    (lambda d: d["model.layers.0.mlp.up_proj"].update(rank=46), "not fewer than the dense"),
    (lambda d: d["model.layers.0.mlp.up_proj"].update(rank=2.5), "whole number"),
    (lambda d: d["model.layers.0.mlp.up_proj"].update(shape=[64, 64]), "planned as 64 x 64"),
])
def test_plan_validation_names_the_module_and_the_fix(edit, needle):
    model = tiny_model("llama")
    shapes = target_shapes(model)
    data = Plan.uniform(shapes, 0.2).to_dict()
    edit(data["modules"])
    with pytest.raises(PlanError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Plan.from_dict(data).validate(shapes)
    assert largest_useful_rank(160, 64) == 45  # 45 * 224 = 10080 < 10240; 46 * 224 = 10304


def test_bad_plan_fails_before_step_1_runs(tiny_dir, tmp_path, capsys):
    plan_path = str(tmp_path / "plan.json")
    data = Plan.uniform(target_shapes(tiny_model("llama")), 0.2).to_dict()
    data["modules"]["model.layers.0.self_attn.q_proj"]["rank"] = 0
    json.dump(data, open(plan_path, "w"))
    out = tmp_path / "out"
    rc = compress.main(["--step", "1,3", "--model", tiny_dir, "--dataset", "random", "--whitening_nsamples", "2",
                        "--model_seq_len", "16", "--save_path", str(out), "--plan", plan_path, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "q_proj has rank 0" in err and len([l for l in err.splitlines() if "error" in l]) == 1
    assert not out.exists()  # step 1 never ran


# ------------------------------------------------------------------------------------------ walk

def test_two_stream_walk_carries_compressed_and_original_activations():
    """Layer i+1 gets the changed layer i's outputs; the reference stream gets the original's."""
    original, changed = tiny_model("llama"), tiny_model("llama")
    windows = WINDOWS[:3]
    seen = []

    def change(context):
        seen.append((context.inputs.clone(), context.reference_inputs.clone(), context.reference_outputs.clone()))
        with torch.no_grad():  # any change of the layer: scale one matrix
            context.layer.mlp.down_proj.weight.mul_(0.5)

    walk_layers(changed, windows, "cpu", change, "t", reference=True)
    with torch.no_grad():
        hidden_original = [original(w[None], output_hidden_states=True).hidden_states for w in windows]
        hidden_changed = [changed(w[None], output_hidden_states=True).hidden_states for w in windows]
    for index, (inputs, reference_inputs, reference_outputs) in enumerate(seen):
        compressed_stream = torch.cat([h[index] for h in hidden_changed])
        original_stream = torch.cat([h[index] for h in hidden_original])
        assert torch.allclose(inputs, compressed_stream, atol=1e-5)
        assert torch.allclose(reference_inputs, original_stream, atol=1e-5)
        if index > 0:
            assert not torch.allclose(inputs, reference_inputs, atol=1e-3)  # the streams did part
    # the last reference outputs are the original model's last layer outputs (before the final norm)
    last = decoder_layers(original)[-1]
    expected = torch.cat([h[-2] for h in hidden_original])
    with torch.no_grad():
        from utils.layerwise import capture_layer_inputs, run_layer
        _, layer_args = capture_layer_inputs(original, windows, "cpu")
        assert torch.allclose(seen[-1][2], run_layer(last, expected, layer_args[-1]), atol=1e-5)


def test_a_walk_without_activations_captures_nothing(monkeypatch):
    from utils import layerwise
    monkeypatch.setattr(layerwise, "capture_layer_inputs", lambda *a: pytest.fail("captured"))
    model = tiny_model("llama")
    stats = None
    plan = Plan.uniform(target_shapes(model), 0.4)
    record = compress_model(model, plan, CompressOptions(DecomposeOptions(whitening="none")), "cpu", stats)
    assert len(record["ranks"]) == 14 and record["update"] is None


# ------------------------------------------------------------------------------------------ losses

@pytest.fixture(scope="module")
def float64_stats():
    model = tiny_model("llama").double()
    return profile_model(model, WINDOWS, "cpu", gram_dtype=torch.float64)


def test_recorded_truncation_loss_is_the_measured_output_error(float64_stats):
    """||X (W - u v)^T||_F on the calibration inputs equals the recorded loss (float64, 1e-6): a
    matrix whitened with another stream's Gram, or the wrong layer's, fails this."""
    original, model = tiny_model("llama").double(), tiny_model("llama").double()
    names = list(target_shapes(model))
    inputs = _module_inputs(original, WINDOWS, names)
    record = compress_model(model, Plan.uniform(target_shapes(model), 0.4),
                            CompressOptions(DecomposeOptions(svd_dtype=torch.float64)), "cpu", float64_stats)
    assert record["fallbacks"] == 0  # full-rank Grams: no shift, so the identity is exact
    for name in names:
        weight = original.get_submodule(name).weight.detach().double()
        measured = float(torch.linalg.matrix_norm(inputs[name] @ (weight - model.get_submodule(name).weight_product.detach()).T))
        assert measured == pytest.approx(record["modules"][name]["truncation_loss"], rel=1e-6), name


def test_eigen_and_cholesky_whitening_lose_the_same(float64_stats):
    losses = {}
    for whitening in ("cholesky", "eigen"):
        model = tiny_model("llama").double()
        record = compress_model(model, Plan.uniform(target_shapes(model), 0.4),
                                CompressOptions(DecomposeOptions(whitening=whitening, svd_dtype=torch.float64)),
                                "cpu", float64_stats)
        losses[whitening] = {n: r["truncation_loss"] for n, r in record["modules"].items()}
    for name, loss in losses["cholesky"].items():
        assert losses["eigen"][name] == pytest.approx(loss, rel=1e-8), name


def test_randomized_svd_loses_within_one_percent_of_exact(float64_stats):
    losses = {}
    for decomposition in ("svd", "rsvd"):
        model = tiny_model("llama").double()
        # ratio 0.6: ranks 12-25 of 32-64 wide, so the sketch (rank + 8) does not cover the matrix
        options = DecomposeOptions(decomposition=decomposition, svd_dtype=torch.float64, rsvd_oversamples=8)
        record = compress_model(model, Plan.uniform(target_shapes(model), 0.6), CompressOptions(options),
                                "cpu", float64_stats)
        losses[decomposition] = {n: r["truncation_loss"] for n, r in record["modules"].items()}
    excess = [losses["rsvd"][n] / losses["svd"][n] - 1 for n in losses["svd"]]
    assert max(excess) < 0.01 and min(excess) > -1e-9  # never better than the optimum


# ------------------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip(dtype, tmp_path):
    """A checkpoint in half precision stays in it (--dtype auto): compress, save, load, evaluate."""
    import evaluater
    from safetensors import safe_open
    source = str(tmp_path / "src")
    tiny_model("llama").to(getattr(torch, dtype)).save_pretrained(source)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "1,3", "--model", source, "--dataset", "random", "--whitening_nsamples", "8",
                          "--model_seq_len", "32", "--save_path", out, "--device", "cpu"]) == 0
    dtypes = set()
    for name in (n for n in os.listdir(out) if n.endswith(".safetensors")):  # step 3 writes shards
        with safe_open(os.path.join(out, name), "pt") as handle:
            dtypes |= {handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert dtypes == {"F16" if dtype == "float16" else "BF16"}
    model, _, block = load_compressed(out)
    assert block["dtype"] == dtype and next(model.parameters()).dtype == getattr(torch, dtype)
    result = evaluater.perplexity(model, WINDOWS.flatten(), 32)
    assert result["ppl"] == pytest.approx(hand_ppl(model, WINDOWS)[0], rel=1e-4)


# ------------------------------------------------------------------------------------------ CLI

def _argv(tiny_dir, out, *extra):
    return ["--step", "1,3", "--model", tiny_dir, "--dataset", "random", "--whitening_nsamples", "4",
            "--model_seq_len", "16", "--save_path", str(out), "--device", "cpu", *extra]


def test_earlier_output_is_replaced_only_with_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert compress.main(_argv(tiny_dir, out)) == 0
    shard = out / "model-00001-of-00003.safetensors"  # layer 0's shard
    before = shard.read_bytes()
    assert compress.main(_argv(tiny_dir, out, "--ratio", "0.6")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert shard.read_bytes() == before
    assert compress.main(_argv(tiny_dir, out, "--ratio", "0.6", "--overwrite")) == 0
    assert shard.read_bytes() != before


@pytest.mark.parametrize("what", ["file", "directory"])
def test_unrelated_output_path_is_never_touched(what, tiny_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    if what == "file":
        out.write_text("my notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    rc = compress.main(_argv(tiny_dir, out, "--overwrite"))
    assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert (out if what == "file" else out / "notes.txt").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_save_path_inside_the_model_directory_is_refused(tiny_dir, capsys):
    before = sorted(os.listdir(tiny_dir))
    assert compress.main(_argv(tiny_dir, os.path.join(tiny_dir, "compressed"))) == 2
    assert sorted(os.listdir(tiny_dir)) == before


def test_hub_data_set_offline_is_refused_before_step_1(tiny_dir, tmp_path, monkeypatch, capsys):
    from utils import data
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    out = tmp_path / "out"
    # calibration is local, but step 4's default --eval_datasets wikitext2 needs the hub
    rc = compress.main(_argv(tiny_dir, out)[:1] + ["1-4"] + _argv(tiny_dir, out)[2:])
    assert rc == 2 and "--eval_datasets wikitext2 needs the Hugging Face hub" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [
    (["--step", "4", "--eval_limit", "0"], "--eval_limit 0"),
    (["--step", "1", "--num_layers", "0"], "--num_layers 0"),
    (["--step", "2"], "step 2 writes the plan"),
])
def test_bad_numbers_are_one_line_errors(extra, needle, tiny_dir, capsys):
    argv = ["--model", tiny_dir, "--device", "cpu", "--dataset", "random", "--eval_datasets", "pydoc"]
    if extra[1] == "1":
        argv += ["--stats_path", "/nonexistent/never/written"]
    assert compress.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_inside_the_walk_exits_130_and_writes_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    from methods import decompose
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # inside layer 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = decompose.low_rank_factors
    monkeypatch.setattr(decompose, "low_rank_factors", interrupted)
    stats_dir = tmp_path / "stats"
    assert compress.main(_argv(tiny_dir, tmp_path / "out", "--stats_path", str(stats_dir))[:1] + ["1"]
                         + _argv(tiny_dir, tmp_path / "out", "--stats_path", str(stats_dir))[2:]) == 0
    rc = compress.main(["--step", "3", "--model", tiny_dir, "--stats_path", str(stats_dir),
                        "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 130 and err.strip().splitlines()[-1].startswith("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["stats"]  # no model, no partial


def test_ctrl_c_leaves_the_model_whole(float64_stats, monkeypatch):
    from methods import decompose
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(decompose, "low_rank_factors", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        compress_model(model, Plan.uniform(target_shapes(model), 0.4), CompressOptions(), "cpu", float64_stats)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_non_finite_activations_are_named_where_collected(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    broken = str(tmp_path / "broken")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(broken)
    rc = compress.main(_argv(broken, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and "non-finite activations entering model.layers.0.mlp.down_proj" not in err
    assert "non-finite activations entering model.layers.1." in err and "--dtype float32" in err
    assert not (tmp_path / "out").exists()


def test_update_needs_windows_and_records_its_options(float64_stats):
    model = tiny_model("llama").double()
    plan = Plan.uniform(target_shapes(model), 0.4)
    with pytest.raises(PipelineError, match="calibration windows"):
        compress_model(model, plan, CompressOptions(update=UpdateOptions(nsamples=4)), "cpu", float64_stats)
    record = compress_model(model, plan, CompressOptions(update=UpdateOptions(nsamples=4)), "cpu",
                            float64_stats, WINDOWS)
    assert record["update"]["nsamples"] == 4 and record["update"]["sequential"] is True
    assert sum("update" in r for r in record["modules"].values()) == 14


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """README's Python block, on a tiny model with a byte tokenizer and short windows."""
    import re
    from scripts.sweep import make_tiny_model
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    block = re.search(r"### Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    assert len(block.strip().splitlines()) <= 10
    tiny = make_tiny_model(str(tmp_path))
    code = (block.replace('"smollm2-135m"', repr(tiny)).replace("nsamples=32", "nsamples=8")
            .replace("seq_len=512", "seq_len=32").replace('"out/smol-20"', repr(str(tmp_path / "smol"))))
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    exec(compile(code, "README.md", "exec"), {})
    model, tokenizer, _ = load_compressed(str(tmp_path / "smol"))  # the printed perplexity is the reloaded model's
    text = load_text("pydoc[0.9:1]", "test")
    assert len(printed) == 1 and printed[0][0] == pytest.approx(hand_text_ppl(model, tokenizer, text, 32), rel=1e-5)
    assert os.path.isfile(tmp_path / "smol" / "modeling_svd_compress.py")


def test_v2_allocation_meets_the_budget_and_drives_step_3(tiny_dir, tmp_path):
    """Step 2 --allocation v2: removed fraction in [ratio, ratio + 0.5%], ranks move with the
    truncation loss (not all uniform), and step 3 records which allocation made the model."""
    from utils.plan import rank_for_ratio
    out = tmp_path / "out"
    assert compress.main(["--step", "1-3", "--model", tiny_dir, "--dataset", "random", "--whitening_nsamples", "8",
                          "--model_seq_len", "32", "--save_path", str(out), "--device", "cpu", "--ratio", "0.4",
                          "--allocation", "v2"]) == 0
    plan = Plan.load(str(tmp_path / "out.stats" / "plan_0.4.json"))
    assert plan.allocation == "v2" and 0.4 <= plan.removed_fraction() <= 0.405
    uniform = {n: rank_for_ratio(p.out_features, p.in_features, 0.4) for n, p in plan.modules.items()}
    assert any(p.rank != uniform[n] for n, p in plan.modules.items())
    for n, p in plan.modules.items():  # max_shift 0.15 bounds each ratio: a rank within reach of uniform
        assert p.rank is not None and abs(p.rank - uniform[n]) <= 0.3 * uniform[n] + 1, n
    block = load_compressed(str(out))[2]
    assert block["plan"]["allocation"] == "v2" and block["ranks"] == plan.ranks
    assert set(block["plan"]["detail"]["groups"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"}
