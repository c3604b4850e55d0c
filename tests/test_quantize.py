"""Step 8 on tiny models: the quantized linear, the GPTQ / RTN pass, packed storage, loading, CLI."""
import copy
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from component import LowRankLinear, QuantLinear, quant_linear_from, set_weight_cache, unpack_codes
from gptq import GPTQ, PACK_BITS, QuantSpec, dequantize, pack, packed_nbytes, rtn, unpack
from methods import quantize as quantize_module
from methods.quantize import QuantizeError, QuantizeOptions
from tests.tiny_models import FAMILIES, save_tiny_model, tiny_model
from utils.io import load_compressed, safetensors_tensor_bytes, save_compressed
from utils.model import target_shapes
from pipeline.steps import (CompressOptions, compress_model, compression_block, linear_storage, linear_units,
                            profile_model, quantize_model, uncompressed_block)
from utils.plan import Plan

pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def ids() -> torch.Tensor:
    return windows(2, 16, seed=5)


def low_rank(family: str, ratio: float = 0.3, dense: tuple[str, ...] = ()) -> tuple[torch.nn.Module, dict]:
    """A tiny model made low-rank in memory (SVD-LLM whitening), with the matrices whose name ends
    in one of `dense` kept dense by the plan; returns the model and its compression block."""
    model = tiny_model(family)
    stats = profile_model(model, windows(), "cpu")
    plan = Plan.uniform(target_shapes(model), ratio)
    for name, module_plan in plan.modules.items():
        if name.endswith(dense):
            module_plan.rank = None
    record = compress_model(model, plan, CompressOptions(), "cpu", stats)
    return model, compression_block(record, "tiny", model, stats)


def quantized(family: str, options: QuantizeOptions, low_rank_ratio: float | None = 0.3):
    """(float model, quantized copy, compression block with the quantization section)."""
    if low_rank_ratio is None:
        model = tiny_model(family)
        block = uncompressed_block("tiny", model)
    else:
        model, block = low_rank(family, low_rank_ratio)
    result = copy.deepcopy(model)
    section = quantize_model(result, options, "cpu", windows(), {"dataset": "random", "seed": 0})
    return model, result, {**block, "quantization": section}


def logits(model, tokens=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens if tokens is not None else ids()).logits


# ---------------------------------------------------------------------------------- the component

@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("columns", [1, 7, 24, 61])
def test_unpack_codes_is_the_inverse_of_gptq_pack(bits, columns):
    codes = torch.randint(0, 2 ** bits, (5, columns), generator=torch.Generator().manual_seed(columns),
                          dtype=torch.uint8)
    packed, shape = pack(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, columns), codes)
    assert torch.equal(unpack_codes(packed, bits, columns), unpack(packed, bits, shape))
    assert torch.equal(unpack_codes(packed, bits, columns, torch.float32), codes.float())


@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("groupsize,act_order", [(-1, False), (32, False), (48, False), (32, True)])
def test_quant_linear_holds_exactly_the_quantized_weight(bits, groupsize, act_order):
    """QuantLinear de-quantizes, from its float16 scales and zeros and packed codes, to exactly the Q
    GPTQ's error feedback used and its recorded loss is of, whatever the group layout: per row, whole
    groups, a shorter last group (100 = 2 x 48 + 4), act_order's g_idx."""
    generator = torch.Generator().manual_seed(bits)
    w, x = torch.randn(12, 100, generator=generator), torch.randn(300, 100, generator=generator)
    solver = GPTQ(100)
    solver.add_batch(x)
    qw = solver.solve(w, QuantSpec(bits, groupsize), act_order=act_order, keep_q=True)
    bias = torch.randn(12, generator=generator)
    module = quant_linear_from(qw, bias, torch.float32)
    assert (module.g_idx is not None) == (act_order and groupsize != -1)
    stored = module.dequantized_weight()
    assert torch.equal(stored, solver.q_used), "the stored weight is not the one the solve's error was of"
    assert torch.equal(module.scales.float(), qw.scale) and torch.equal(module.zeros.float(), qw.zero)
    assert torch.equal(module.codes(), qw.codes)
    assert torch.equal(module(x[:7]), torch.nn.functional.linear(x[:7], stored, bias))
    # the recorded loss is the damped objective tr((W - Q)(H + damp I)(W - Q)^T) / 2 of the stored Q
    H = solver.H + 0.01 * torch.diag(solver.H).mean() * torch.eye(100, dtype=solver.H.dtype)
    d = (w - stored).double()
    assert solver.last_loss == pytest.approx(0.5 * float(torch.trace(d @ H @ d.T)), rel=1e-5)


def test_dtype_casts_keep_the_float16_scales_and_the_cache_is_never_saved():
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    module = quant_linear_from(rtn(w, QuantSpec(3, 16)), torch.zeros(8), torch.float32)
    scales, zeros = module.scales.clone(), module.zeros.clone()
    for cast in (torch.float64, torch.bfloat16, torch.float32):
        module.to(cast)
        assert module.scales.dtype == torch.float16 and torch.equal(module.scales, scales)
        assert torch.equal(module.zeros, zeros) and module.qweight.dtype == torch.uint8
        assert module.bias.dtype == cast
    x = torch.randn(3, 40)
    per_forward = module(x)
    module.cache_weight = True
    assert torch.equal(module(x), per_forward) and module.weight_cache is not None
    assert "weight_cache" not in module.state_dict()
    other = quant_linear_from(rtn(2 * w, QuantSpec(3, 16)), torch.zeros(8), torch.float32)
    module.load_state_dict(other.state_dict())  # new codes: the cache must not outlive them
    assert torch.equal(module(x), other(x))
    assert set_weight_cache(torch.nn.Sequential(module, other), False) == 2 and module.weight_cache is None


def test_options_refuse_what_cannot_be_stored():
    for bad in ({"wbits": 6}, {"wbits": 5}, {"method": "awq"}, {"groupsize": 0},
                {"method": "rtn", "act_order": True}, {"percdamp": -0.1}, {"blocksize": 0}):
        with pytest.raises(QuantizeError):
            QuantizeOptions(**bad)
    with pytest.raises(QuantizeError, match="2, 3, 4, 8"):
        QuantizeOptions(wbits=6)


# ---------------------------------------------------------------------------------- save and load

CASES = {
    "gptq4_g32_low_rank": (QuantizeOptions("gptq", 4, 32), 0.3),
    "gptq3_act_order_low_rank": (QuantizeOptions("gptq", 3, 16, act_order=True), 0.3),
    "gptq2_dense": (QuantizeOptions("gptq", 2, 32, sym=True), None),
    "rtn8_per_row_low_rank": (QuantizeOptions("rtn", 8, -1), 0.3),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family with GPTQ 4-bit on a low-rank model, and llama in every case; saved once."""
    out = {}
    runs = [(family, "gptq4_g32_low_rank") for family in FAMILIES] + [("llama", c) for c in CASES if c != "gptq4_g32_low_rank"]
    for family, case in runs:
        options, ratio = CASES[case]
        original, model, block = quantized(family, options, ratio)
        path = str(tmp_path_factory.mktemp("quantized") / f"{family}-{case}")
        save_compressed(model, None, path, block)
        out[(family, case)] = (original, model, block, path)
    return out


def test_saved_quantized_model_loads_with_identical_logits(saved):
    for (family, case), (_, model, block, path) in saved.items():
        expected = logits(model)
        ours, _, loaded_block = load_compressed(path)
        assert loaded_block["quantization"]["modules"] == block["quantization"]["modules"]
        assert torch.equal(logits(ours), expected), (family, case)
        remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        assert torch.equal(logits(remote), expected), (family, case)
        names = set(block["quantization"]["modules"])
        assert {n for n, m in remote.named_modules() if type(m).__name__ == "QuantLinear"} == names
        assert {n for n, m in ours.named_modules() if isinstance(m, QuantLinear)} == names
        if block["ranks"]:  # low rank: every low-rank layer has both factors quantized
            for name in block["ranks"]:
                module = ours.get_submodule(name)
                assert isinstance(module, LowRankLinear)
                assert isinstance(module.u, QuantLinear) and isinstance(module.v, QuantLinear)


def test_single_file_pt_and_dtype_of_the_loaded_model(saved, tmp_path):
    _, model, block, _ = saved[("qwen2", "gptq4_g32_low_rank")]  # qwen2: u carries q/k/v biases
    path = str(tmp_path / "model.pt")
    save_compressed(model, None, path, block)
    loaded, _, _ = load_compressed(path)
    assert torch.equal(logits(loaded), logits(model))
    assert next(loaded.parameters()).dtype == torch.float32  # not uint8 / float16 of the quantized buffers
    half, _, _ = load_compressed(path, torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    q = next(m for m in half.modules() if isinstance(m, QuantLinear))
    assert q.scales.dtype == torch.float16 and torch.isfinite(logits(half).float()).all()


def test_dequantized_weights_take_only_the_levels_of_their_group(saved):
    for (family, case), (_, _, block, path) in saved.items():
        model, _, _ = load_compressed(path)
        for name, module in model.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            weight, bits = module.dequantized_weight(), module.bits
            groups = (module.g_idx.long() if module.g_idx is not None
                      else torch.arange(module.in_features) // (module.groupsize if module.groupsize != -1
                                                                else module.in_features))
            assert module.bits == block["quantization"]["modules"][name]["bits"]
            for g in torch.unique(groups).tolist():
                columns = weight[:, groups == g]
                scale, zero = module.scales[:, g].float()[:, None], module.zeros[:, g].float()[:, None]
                levels = columns / scale + zero  # the integer code of every entry
                assert torch.allclose(levels, levels.round(), atol=1e-3), (family, case, name)
                assert levels.round().min() >= 0 and levels.round().max() <= 2 ** bits - 1
                assert max(torch.unique(row).numel() for row in columns) <= 2 ** bits


def test_file_is_the_theoretical_packed_size_plus_scales(saved):
    """Bytes in model.safetensors: the file is its header plus its tensors, nothing else; the linears'
    tensors are within 2% of ceil(out in bits / 8) + 4 bytes (float16 scale and zero) per (row, group)."""
    for (family, case), (_, model, block, path) in saved.items():
        file = os.path.join(path, "model.safetensors")
        tensor_bytes = safetensors_tensor_bytes(file)
        with open(file, "rb") as handle:
            header = 8 + int.from_bytes(handle.read(8), "little")
        assert os.path.getsize(file) == header + sum(tensor_bytes.values())
        records = block["quantization"]["modules"]
        theory = sum(packed_nbytes((r["out_features"], r["in_features"]), r["bits"], r["groupsize"])
                     for r in records.values())
        stored = sum(b for k, b in tensor_bytes.items() if k.rsplit(".", 1)[0] in records
                     and k.rsplit(".", 1)[1] in ("qweight", "scales", "zeros"))
        assert theory <= stored <= 1.02 * theory, (family, case, stored, theory)
        # what linear_storage reports is what the file holds
        from_file = linear_storage(model, tensor_bytes)
        assert from_file["linear_bytes"] == block["quantization"]["linear_storage"]["linear_bytes"]
        bias_and_gidx = sum(b for k, b in tensor_bytes.items() if k.rsplit(".", 1)[0] in records
                            and k.rsplit(".", 1)[1] in ("bias", "g_idx"))
        assert from_file["linear_bytes"] == stored + bias_and_gidx
        assert from_file["bits_per_weight"] == pytest.approx(8 * from_file["linear_bytes"] / from_file["weights"], abs=1e-4)


def test_bits_per_weight_by_hand():
    """GPTQ 4-bit group 32 on the dense tiny llama: (4 + 32 / 32) bits per weight exactly."""
    _, model, block = quantized("llama", QuantizeOptions("gptq", 4, 32), None)
    storage = block["quantization"]["linear_storage"]
    weights = sum(m * n for m, n, _ in target_shapes(tiny_model("llama")).values())
    assert storage["weights"] == weights and storage["fp16_bytes"] == 2 * weights
    assert storage["linear_bytes"] == weights // 2 + 4 * weights // 32
    assert storage["bits_per_weight"] == 5.0 and storage["fraction_of_fp16"] == 5 / 16
    assert block["ranks"] == {} and block["method"] == "none"


# ---------------------------------------------------------------------------------- the GPTQ pass

def hessians_of_inputs(model, modules: dict[str, torch.nn.Module], data: torch.Tensor) -> dict[str, torch.Tensor]:
    """2/n sum x x^T of each module's actual input when `model` runs the windows one at a time."""
    sums, counts, handles = {}, {}, []
    for name, module in modules.items():
        def hook(_m, inputs, name=name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for window in data:
            model(window[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: 2 * sums[name] / counts[name] for name in sums}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_gptq_is_sequential_within_the_layer_and_u_sees_the_quantized_v(monkeypatch):
    """Every solve's Hessian must be that of the inputs the module has in the FINISHED model: u's from
    the outputs of the quantized v, o_proj's (kept dense) from the quantized attention, each layer's
    from the quantized layers before. Solving u against the float v's outputs, or o_proj against the
    float layer's, fails the first assertions by orders of magnitude (checked by the second)."""
    solved: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recording(GPTQ):
        def solve(self, weight, *args, **kwargs):
            solved.append((weight.detach().clone(), self.H.clone()))
            return super().solve(weight, *args, **kwargs)

    monkeypatch.setattr(quantize_module, "GPTQ", Recording)
    model, _ = low_rank("llama", 0.3, dense=("o_proj",))
    float_model = copy.deepcopy(model)
    data = windows()
    quantize_model(model, QuantizeOptions("gptq", 2, 16), "cpu", data)
    assert len(solved) == sum(2 if isinstance(m, LowRankLinear) else 1 for m in linear_units(float_model).values())

    def recorded(weight: torch.Tensor) -> torch.Tensor:
        matches = [H for w, H in solved if w.shape == weight.shape and torch.equal(w, weight.detach())]
        assert len(matches) == 1
        return matches[0]

    units = linear_units(model)
    float_units = linear_units(float_model)
    targets = {}
    for name, module in units.items():
        targets[name] = module.u if isinstance(module, LowRankLinear) else module
    actual = hessians_of_inputs(model, targets, data)
    wrong = hessians_of_inputs(float_model, {n: (m.u if isinstance(m, LowRankLinear) else m)
                                             for n, m in float_units.items()}, data)
    for name, float_module in float_units.items():
        weight = float_module.u.weight if isinstance(float_module, LowRankLinear) else float_module.weight
        H = recorded(weight)
        assert relative(H, actual[name]) < 1e-5, name
        # the float stream's Hessian is far off, so the check above tells the two apart
        assert relative(wrong[name], actual[name]) > 1e-3, name


def test_gptq_output_error_below_rtn_on_the_calibration_windows():
    """At 3 bits, group 16, on the windows it was calibrated on, GPTQ's model is closer to the float
    model than RTN's (logit error measured: 0.66-0.74 of RTN's over 4 model and data seeds; asserted < 0.9)."""
    model, _ = low_rank("llama", 0.3)
    data = windows()
    reference = logits(model, data)
    errors = {}
    for method in ("gptq", "rtn"):
        result = copy.deepcopy(model)
        quantize_model(result, QuantizeOptions(method, 3, 16), "cpu", data)
        errors[method] = float(torch.linalg.norm(logits(result, data) - reference))
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_records_and_refusals():
    _, model, block = quantized("llama", QuantizeOptions("gptq", 4, 32), 0.3)
    section = block["quantization"]
    assert section["method"] == "gptq" and section["wbits"] == 4 and section["groupsize"] == 32
    assert section["calibration"] == {"dataset": "random", "seed": 0, "nsamples": 8, "seq_len": 32, "tokens": 256}
    for name, record in section["modules"].items():
        assert record["bits"] == 4 and record["groupsize"] == 32 and record["method"] == "gptq"
        assert record["loss"] > 0 and 0 < record["relative_loss"] < 0.1
        assert record["hessian"] == ("outputs of the quantized v" if name.endswith(".u") else "inputs")
    assert section["quantized_matrices"] == 2 * len(block["ranks"])
    from pipeline.steps import PipelineError
    with pytest.raises(PipelineError, match="already quantized"):
        quantize_model(model, QuantizeOptions("rtn", 8, -1), "cpu")
    with pytest.raises(PipelineError, match="calibration windows"):
        quantize_model(tiny_model("llama"), QuantizeOptions("gptq", 4, 32), "cpu")


# ---------------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("models")))


def run_cli(*argv: str) -> int:
    return compress.main([*argv, "--device", "cpu"])


def test_cli_step8_on_the_original_and_weight_quant_on_step3(model_dir, tmp_path):
    common = ["--model", model_dir, "--dataset", "random", "--model_seq_len", "32"]
    gptq_path = str(tmp_path / "gptq")
    assert run_cli("--step", "8", *common, "--nsamples", "8", "--wbits", "3", "--groupsize", "32",
                   "--save_path", gptq_path) == 0
    block = json.load(open(os.path.join(gptq_path, "config.json")))["compression"]
    assert block["ranks"] == {} and block["quantization"]["method"] == "gptq"
    assert block["quantization"]["calibration"]["nsamples"] == 8
    assert all(r["bits"] == 3 for r in block["quantization"]["modules"].values())
    int8_path = str(tmp_path / "svd-int8")
    assert run_cli("--step", "1-3", *common, "--whitening_nsamples", "8", "--weight_quant", "rtn_int8",
                   "--save_path", int8_path) == 0
    block = json.load(open(os.path.join(int8_path, "config.json")))["compression"]
    assert block["ranks"] and block["method"] == "svd-llm"
    section = block["quantization"]
    assert (section["method"], section["wbits"], section["groupsize"], section["calibration"]) == ("rtn", 8, -1, None)
    assert set(section["modules"]) == {f"{n}.{f}" for n in block["ranks"] for f in ("u", "v")}
    assert os.path.isfile(os.path.join(int8_path + ".stats", "meta.json"))  # step 1's statistics, beside the model
    model, _, _ = load_compressed(int8_path)
    assert all(isinstance(model.get_submodule(f"{n}.u"), QuantLinear) for n in block["ranks"])
    # step 8 from a saved step-3 model: the low-rank block gets the quantization section
    low_rank_path = str(tmp_path / "svd")
    assert run_cli("--step", "3", *common, "--stats_path", int8_path + ".stats",
                   "--save_path", low_rank_path) == 0
    both = str(tmp_path / "svd-gptq")
    assert run_cli("--step", "8", "--model_path", low_rank_path, "--dataset", "random", "--model_seq_len", "32",
                   "--nsamples", "8", "--save_path", both) == 0
    block = json.load(open(os.path.join(both, "config.json")))["compression"]
    assert block["ranks"] and block["quantization"]["method"] == "gptq"


def test_cli_step_3_8_writes_the_save_path_once_with_the_quantized_model(model_dir, tmp_path, monkeypatch):
    """Chained steps hand the model over in memory: --step 3,8 writes only step 8's model (it used to
    write the float model of step 3 and then replace it)."""
    import utils.io
    written = []
    save = utils.io.save_compressed

    def counting_save(model, tokenizer, path, compression, *args, **kwargs):
        written.append((path, "quantization" in compression))
        return save(model, tokenizer, path, compression, *args, **kwargs)

    monkeypatch.setattr(utils.io, "save_compressed", counting_save)
    path = str(tmp_path / "svd-rtn")
    assert run_cli("--step", "1,3,8", "--model", model_dir, "--dataset", "random", "--model_seq_len", "32",
                   "--whitening_nsamples", "8", "--quant", "rtn", "--save_path", path) == 0
    assert written == [(path, True)]
    model, _, block = load_compressed(path)
    assert block["ranks"] and block["quantization"]["method"] == "rtn"
    assert all(isinstance(model.get_submodule(f"{n}.u"), QuantLinear) for n in block["ranks"])


@pytest.mark.parametrize("flags,message", [
    (["--wbits", "5"], "packed storage exists for 2, 3, 4, 8 bits"),
    (["--wbits", "6"], "packed storage exists for 2, 3, 4, 8 bits"),
    (["--weight_quant", "rtn_int6"], "6-bit codes have no packed layout"),
    (["--weight_quant", "rtn_int8", "--wbits", "4"], "contradicts --wbits 4"),
    (["--quant", "rtn", "--act_order"], "round-to-nearest has no column order"),
    (["--groupsize", "0"], "--groupsize 0"),
    (["--nsamples", "0"], "--nsamples must be at least 1"),
    (["--step", "4,8"], "run it in a second command"),
    (["--step", "6,8"], "--step 6 with step 8"),
    (["--step", "8,9", "--prompt", "hi"], "--step 9 with step 8"),
    (["--no_save"], "--save_path is required"),
    (["--dataset", "nosuchfile.txt"], "neither one of"),
])
def test_cli_errors_exit_2_before_any_work(model_dir, tmp_path, capsys, flags, message):
    save = str(tmp_path / "never")
    argv = ["--step", "8", "--model", model_dir]
    if "--step" in flags:
        argv = argv[2:]
    if "--no_save" in flags:
        flags = [f for f in flags if f != "--no_save"]
    else:
        argv += ["--save_path", save]
    assert run_cli(*argv, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(save)


def test_cli_refuses_a_quantized_model_path_and_weight_quant_without_step3(model_dir, tmp_path, capsys):
    path = str(tmp_path / "rtn")
    assert run_cli("--step", "8", "--model", model_dir, "--quant", "rtn", "--save_path", path) == 0
    capsys.readouterr()
    assert run_cli("--step", "8", "--model_path", path, "--save_path", str(tmp_path / "again")) == 2
    assert "already quantized" in capsys.readouterr().err
    assert run_cli("--step", "1", "--model", model_dir, "--weight_quant", "rtn_int8",
                   "--save_path", str(tmp_path / "x")) == 2
    assert "give --step 3" in capsys.readouterr().err
    assert run_cli("--step", "8", "--model", model_dir, "--quant", "rtn", "--save_path", path) == 2
    assert "--overwrite" in capsys.readouterr().err
