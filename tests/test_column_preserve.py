"""Duo-SVD's column level (issue 20, "Column preservation"): the trade arithmetic, the search, the
layer, and its save/load through our loader and the Hugging Face export."""
from __future__ import annotations

import builtins

import pytest
import torch

from component import ColumnPreservedLinear, LowRankLinear, column_preserved_from
from methods import DecomposeOptions
from tests.tiny_models import tiny_model
from utils.column_preserve import column_preserved_factors, columns_for_trade, trade_params
from utils.decompose import low_rank_factors
from utils.io import load_compressed, save_compressed
from utils.model import count_parameters, decoder_layers, target_linears, target_shapes
from pipeline.steps import CompressOptions, compress_model, compression_block, profile_model
from utils.plan import Plan
from utils.whitening import whitening_factor


def whitened_error(weight, approx, x) -> float:
    return float(torch.linalg.matrix_norm((weight - approx.detach()) @ x.T))


BIG = [2, 5, 11, 17, 23, 30, 41, 47, 52, 60, 66, 75]


@pytest.fixture(scope="module")
def high_energy_columns():
    """96 x 80 weight with 12 input columns 30x larger than the rest (more than the plan's rank
    8 can hold), inputs with correlated channels."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 80, generator=g, dtype=torch.float64)
    weight[:, BIG] *= 30.0
    mixing = torch.eye(80, dtype=torch.float64) + 0.05 * torch.randn(80, 80, generator=g, dtype=torch.float64)
    x = torch.randn(3000, 80, generator=g, dtype=torch.float64) @ mixing
    return weight, x, x.T @ x


def test_trade_arithmetic_never_exceeds_the_plan():
    checked = 0
    for m, n in ((96, 80), (64, 160), (160, 64), (576, 1536), (1536, 576), (576, 192)):
        budget_rank = max(1, (m * n // 2) // (m + n))
        for rank in (1, 2, 7, budget_rank):
            for dr in range(0, rank):
                k = columns_for_trade(m, n, rank, dr)
                assert trade_params(m, n, rank - dr, k) <= rank * (m + n)
                # rounded down, not below: one more column would exceed the budget
                if dr:
                    assert trade_params(m, n, rank - dr, k + 1) > rank * (m + n)
                checked += 1
    assert checked > 600


def test_no_columns_is_exactly_the_plain_low_rank_layer(high_energy_columns):
    weight, x, gram = high_energy_columns
    plain = low_rank_factors(weight, 20, whitening_factor(gram, "cholesky"))
    low_rank = LowRankLinear.from_factors(plain.u, plain.v, torch.ones(96, dtype=torch.float64), torch.float32, "cpu")
    empty = torch.zeros(0, dtype=torch.int64)
    preserved = column_preserved_from(plain.u, plain.v, weight.new_zeros(96, 0), torch.arange(80), empty,
                                      torch.ones(96, dtype=torch.float64), torch.float32, "cpu")
    assert preserved.c is None and set(preserved.state_dict()) == set(low_rank.state_dict())
    inputs = x[:64].float()
    assert torch.equal(preserved(inputs), low_rank(inputs))
    # a trade that is refused (min_gain above any gain) returns the plain factors themselves
    kept = column_preserved_factors(weight, gram, 20, "cholesky", plain=plain, min_gain=10.0)
    assert kept.kept_columns == 0 and kept.rank == 20
    assert torch.equal(kept.u, plain.u) and torch.equal(kept.v, plain.v)


def test_the_trade_lowers_the_whitened_error(high_energy_columns):
    weight, x, gram = high_energy_columns
    m, n = weight.shape
    rank = 8
    trade = column_preserved_factors(weight, gram, rank, "cholesky", svd_dtype=torch.float64)
    assert trade.kept_columns >= 6 and trade.rank < rank
    assert set(trade.col_idx.tolist()) <= set(BIG)
    assert trade.error_after < 0.5 * trade.error_before, (trade.error_after, trade.error_before)
    assert trade_params(m, n, trade.rank, trade.kept_columns) <= rank * (m + n)
    layer = column_preserved_from(trade.u, trade.v, trade.columns, trade.svd_idx, trade.col_idx, None,
                                  torch.float64, "cpu")
    # the error the search promised is the layer's real output error on the calibration inputs
    measured = whitened_error(weight, layer.weight_product, x)
    assert abs(measured - trade.error_after) < 1e-6 * trade.error_before
    plain = low_rank_factors(weight, rank, whitening_factor(gram, "cholesky"), compute_dtype=torch.float64)
    assert abs(whitened_error(weight, plain.u @ plain.v, x) - trade.error_before) < 1e-6 * trade.error_before
    with torch.no_grad():
        assert torch.allclose(layer(x[:32]), x[:32] @ layer.weight_product.T, atol=1e-9)


def test_golden_section_is_close_to_the_exhaustive_optimum(high_energy_columns):
    weight, _, gram = high_energy_columns
    golden = column_preserved_factors(weight, gram, 30, "cholesky", svd_dtype=torch.float64)
    exhaustive = column_preserved_factors(weight, gram, 30, "cholesky", svd_dtype=torch.float64, search="exhaustive")
    assert golden.evaluations < exhaustive.evaluations / 2
    assert golden.error_after <= 1.02 * exhaustive.error_after, (golden.error_after, exhaustive.error_after)
    # where a trade pays (rank 8: 11 columns for 6 rank), the search lands on the exhaustive optimum
    golden = column_preserved_factors(weight, gram, 8, "cholesky", svd_dtype=torch.float64)
    exhaustive = column_preserved_factors(weight, gram, 8, "cholesky", svd_dtype=torch.float64, search="exhaustive")
    assert (golden.rank, golden.kept_columns) == (exhaustive.rank, exhaustive.kept_columns) == (2, 11)


def boosted_tiny_model():
    """A tiny Llama whose first layer's inputs have a few outlier channels (so trades happen)."""
    model = tiny_model("llama")
    with torch.no_grad():
        layer = decoder_layers(model)[0]
        layer.input_layernorm.weight[[3, 30]] *= 40.0
        layer.post_attention_layernorm.weight[[7, 50]] *= 40.0
    return model


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = boosted_tiny_model()
    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = profile_model(model, windows, "cpu")
    plan = Plan.uniform(target_shapes(model), 0.5)
    params = count_parameters(model)
    record = compress_model(model, plan, CompressOptions(DecomposeOptions(column_preserve=True)), "cpu", stats)
    block = compression_block(record, "tiny", model, stats)
    path = str(tmp_path_factory.mktemp("cp") / "model")
    save_compressed(model, None, path, block)
    torch.set_num_threads(threads)
    return model, block, path, plan, params


def test_pass_keeps_columns_within_the_plan(compressed):
    model, block, _, plan, params = compressed
    preserved = block["column_preserved"]
    assert len(preserved) >= 2, block["modules"]
    for name, entry in preserved.items():
        record = block["modules"][name]
        assert record["columns_kept"] == entry["columns"] > 0 and record["rank"] == entry["rank"] < record["plan_rank"]
        assert record["column_error_after"] < 0.99 * record["column_error_before"]
        module = model.get_submodule(name)
        assert isinstance(module, ColumnPreservedLinear)
        m, n = module.out_features, module.in_features
        assert trade_params(m, n, module.rank, module.columns) <= plan.modules[name].rank * (m + n)
    assert count_parameters(model) <= params - (plan.params_before() - plan.params_after()) + \
        len(preserved) * 0  # never above the plan's count (indices are buffers, not parameters)


def test_save_load_round_trip_gives_identical_logits(compressed, monkeypatch):
    model, block, path, _, _ = compressed
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    ours, _, loaded_block = load_compressed(path)
    assert loaded_block["column_preserved"] == block["column_preserved"]
    monkeypatch.setattr(builtins, "input", lambda prompt="": (_ for _ in ()).throw(EOFError("no terminal")))
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(ours(ids).logits, expected)
        # the remote code runs the v factors of q/k/v and gate/up as one matmul: float rounding
        assert (remote(ids).logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    for name, entry in block["column_preserved"].items():
        module = remote.get_submodule(name)
        assert type(module).__name__ == "ColumnPreservedLinear" and module.columns == entry["columns"]
        assert torch.equal(module.col_idx, model.get_submodule(name).col_idx)


def test_damaged_indices_are_refused(compressed, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    from utils.io import CompressedModelError
    _, block, path, _, _ = compressed
    copy = str(tmp_path / "damaged")
    shutil.copytree(path, copy)
    state = load_file(f"{copy}/model.safetensors")
    name = next(iter(block["column_preserved"]))
    state[f"{name}.col_idx"] = state[f"{name}.svd_idx"][: state[f"{name}.col_idx"].numel()].clone()
    save_file(state, f"{copy}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompressedModelError, match="input channels once"):
        load_compressed(copy)


def test_cli_column_preserve_and_its_refusals(tmp_path, capsys):
    import compress
    from tests.tiny_models import save_tiny_model
    tiny = save_tiny_model("llama", str(tmp_path))
    base = ["--model", tiny, "--dataset", "random", "--whitening_nsamples", "4", "--model_seq_len", "16",
            "--device", "cpu", "--save_path", str(tmp_path / "out")]
    assert compress.main(["--step", "3", "--column_preserve", "--whitening", "none", *base]) == 2
    assert "--column_preserve" in capsys.readouterr().err
    assert compress.main(["--step", "3", "--column_preserve", "--update", "closed_form", *base]) == 2
    assert "--update" in capsys.readouterr().err
    assert compress.main(["--step", "1-3", "--column_preserve", "--ratio", "0.5", *base]) == 0
    model, _, block = load_compressed(str(tmp_path / "out"))
    assert block["column_preserve"] is True and block["modules"]
    assert all("columns_kept" in r and r["column_error_after"] <= r["column_error_before"]
               for r in block["modules"].values())


def test_quantized_column_preserved_model_round_trips(compressed, tmp_path):
    """Step 8 on a column-preserving model quantizes u, v and c as plain linears; both loaders rebuild it."""
    from transformers import AutoModelForCausalLM
    from methods.quantize import QuantizeOptions
    from pipeline.steps import quantize_model
    from pipeline.steps import linear_storage
    _, block, path, plan, _ = compressed
    model, _, _ = load_compressed(path)
    quantization = quantize_model(model, QuantizeOptions("rtn", 8, 32), "cpu")
    # storage is counted per original matrix (out x in), a column-preserving layer as one unit
    assert linear_storage(model)["weights"] == sum(p.out_features * p.in_features for p in plan.modules.values())
    assert any(name.endswith(".c") for name in quantization["modules"])
    out = str(tmp_path / "quantized")
    save_compressed(model, None, out, {**block, "quantization": quantization})
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    ours, _, _ = load_compressed(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(ours(ids).logits, expected) and torch.equal(remote(ids).logits, expected)
