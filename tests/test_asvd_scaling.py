"""ASVD's activation-aware scaling (issue 16, "Scaling"): S = diag(stat^alpha) through the
whitening interface, sigma fusing, and the CLI's refusals."""
from __future__ import annotations

import pytest
import torch

import compress
from component import LowRankLinear
from methods import DecomposeOptions
from tests.tiny_models import tiny_model
from utils.decompose import low_rank_factors
from utils.model import target_shapes
from pipeline.steps import CompressOptions, compress_model, profile_model
from utils.plan import Plan
from utils.whitening import ScalingFactor, input_transform, scaling_factor


@pytest.fixture(scope="module")
def outlier_matrix():
    """A 48 x 64 weight whose inputs have a few channels 30x larger than the rest."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=g, dtype=torch.float64)
    x = torch.randn(2000, 64, generator=g, dtype=torch.float64)
    x[:, [3, 17, 40]] *= 30.0
    stats = {"s.abs_sum": x.abs().sum(0), "s.abs_max": x.abs().amax(0).float(),
             "s.tokens": torch.tensor([x.shape[0]]), "s.gram": x.T @ x}
    return weight, x, stats


def output_error(weight, u, v, x) -> float:
    return float(torch.linalg.matrix_norm((weight - u @ v) @ x.T))


def test_alpha_zero_equals_plain_svd_exactly(outlier_matrix):
    weight, _, stats = outlier_matrix
    plain = low_rank_factors(weight, 10, None, compute_dtype=torch.float64)
    scaled = low_rank_factors(weight, 10, input_transform(stats, "s", "cpu", "none", "abs_mean", alpha=0.0),
                              compute_dtype=torch.float64)
    assert torch.equal(plain.u, scaled.u) and torch.equal(plain.v, scaled.v)
    assert input_transform(stats, "s", "cpu", "none", "none") is None


def test_scaling_then_unscaling_reproduces_w_at_full_rank(outlier_matrix):
    weight, _, stats = outlier_matrix
    for scaling in ("abs_mean", "abs_max"):
        factor = input_transform(stats, "s", "cpu", "none", scaling, alpha=0.5)
        assert isinstance(factor, ScalingFactor) and float(factor.scale.max() / factor.scale.min()) > 3.0
        full = low_rank_factors(weight, 48, factor, compute_dtype=torch.float64)
        assert float((full.u @ full.v - weight).abs().max()) < 1e-10


def test_scaling_lowers_the_output_error_on_outlier_channels(outlier_matrix):
    weight, x, stats = outlier_matrix
    plain = low_rank_factors(weight, 12, None, compute_dtype=torch.float64)
    scaled = low_rank_factors(weight, 12, input_transform(stats, "s", "cpu", "none", "abs_mean", 0.5),
                              compute_dtype=torch.float64)
    plain_error, scaled_error = output_error(weight, plain.u, plain.v, x), output_error(weight, scaled.u, scaled.v, x)
    assert scaled_error < 0.8 * plain_error, (scaled_error, plain_error)


def test_sigma_fuse_variants_give_the_same_product(outlier_matrix):
    weight, _, stats = outlier_matrix
    factor = input_transform(stats, "s", "cpu", "none", "abs_mean", 0.5)
    fused = {side: low_rank_factors(weight, 9, factor, compute_dtype=torch.float64, sigma_fuse=side)
             for side in ("UV", "U", "V")}
    product = fused["UV"].u @ fused["UV"].v
    for side in ("U", "V"):
        assert float((fused[side].u @ fused[side].v - product).abs().max()) < 1e-10
    # the split differs: with Sigma on U, v's rows are unit-norm in the scaled space (v S has orthonormal rows)
    vs = fused["U"].v * factor.scale
    assert float((vs @ vs.T - torch.eye(9, dtype=torch.float64)).abs().max()) < 1e-10
    us = fused["V"].u
    assert float((us.T @ us - torch.eye(9, dtype=torch.float64)).abs().max()) < 1e-10
    assert float(fused["U"].u.norm() / fused["V"].u.norm()) > 2.0
    with pytest.raises(ValueError, match="sigma_fuse"):
        low_rank_factors(weight, 9, factor, sigma_fuse="W")


def test_zero_channels_are_guarded():
    factor = scaling_factor(torch.tensor([0.0, 4.0, 1.0]), 0.5)
    assert factor.fallback and float(factor.scale.min()) > 0
    assert torch.allclose(factor.scale[1:], torch.tensor([2.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite or negative"):
        scaling_factor(torch.tensor([1.0, float("nan")]), 0.5)


def test_whitening_and_scaling_together_are_refused(outlier_matrix):
    _, _, stats = outlier_matrix
    with pytest.raises(ValueError, match="alternatives"):
        input_transform(stats, "s", "cpu", "cholesky", "abs_mean")
    with pytest.raises(ValueError, match="alternatives"):
        DecomposeOptions(whitening="cholesky", scaling="abs_mean")


def test_abs_max_missing_from_old_statistics_is_a_clear_error(outlier_matrix):
    _, _, stats = outlier_matrix
    old = {k: v for k, v in stats.items() if not k.endswith("abs_max")}
    with pytest.raises(ValueError, match="older step 1"):
        input_transform(old, "s", "cpu", "none", "abs_max")
    with pytest.raises(ValueError, match="--fisher"):
        input_transform(stats, "s", "cpu", "none", "fisher")


def test_pass_with_alpha_zero_equals_plain_svd_on_a_tiny_model(one_thread):
    torch.manual_seed(0)
    windows = torch.randint(0, 256, (4, 32))
    models = [tiny_model("llama") for _ in range(3)]
    stats = profile_model(models[0], windows, "cpu")
    plan = Plan.uniform(target_shapes(models[0]), 0.4)
    configs = [DecomposeOptions(whitening="none", svd_dtype=torch.float64),
               DecomposeOptions(whitening="none", scaling="abs_mean", alpha=0.0, svd_dtype=torch.float64),
               DecomposeOptions(whitening="none", scaling="abs_mean", alpha=0.5, svd_dtype=torch.float64)]
    records = [compress_model(m, plan, CompressOptions(o), "cpu", stats) for m, o in zip(models, configs)]
    first, same, other = ([m.weight_product for m in model.modules() if isinstance(m, LowRankLinear)]
                          for model in models)
    assert len(first) == 14
    assert all(torch.equal(a, b) for a, b in zip(first, same))
    assert max(float((a - b).abs().max()) for a, b in zip(first, other)) > 1e-3
    assert records[2]["scaling"] == "abs_mean" and records[2]["alpha"] == 0.5


def run_cli(argv, capsys):
    code = compress.main(argv)
    return code, capsys.readouterr().err


def test_cli_refuses_scaling_with_whitening(tmp_path, capsys):
    code, err = run_cli(["--step", "3", "--model", "smollm2-135m", "--save_path", str(tmp_path / "m"),
                         "--scaling", "abs_mean", "--whitening", "cholesky"], capsys)
    assert code == 2 and "alternatives" in err and err.count("\n") == 1


def test_cli_asvd_aliases(tmp_path):
    parser = compress.build_parser()
    args = parser.parse_args(["--step", "1", "--act_aware", "--n_calib_samples", "7", "--calib_dataset", "pydoc",
                              "--save_path", str(tmp_path / "m")])
    args.steps = [1]
    compress._resolve_method_flags(args)
    assert (args.scaling, args.whitening, args.whitening_nsamples, args.dataset) == ("abs_mean", "none", 7, "pydoc")
    args = parser.parse_args(["--step", "3", "--act_aware", "--scaling_method", "abs_max"])
    args.steps = [3]
    compress._resolve_method_flags(args)
    assert (args.scaling, args.whitening) == ("abs_max", "none")
    args = parser.parse_args(["--step", "3"])
    args.steps = [3]
    compress._resolve_method_flags(args)
    assert (args.scaling, args.whitening) == ("none", "cholesky")
