"""The algorithms without a model: whitening, truncation, ranks, closed-form update."""
import pytest
import torch

from utils.decompose import low_rank_factors, low_rank_params, rank_for_ratio
from utils.stats import InputStatistics
from utils.update import closed_form_u, output_error, update_u
from utils.whitening import cholesky_factor, eigen_factor, whitening_factor


def correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Activations with a strongly non-isotropic covariance, like real LLM inputs."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, width, dtype=torch.float64)
    return torch.randn(tokens, width, generator=g, dtype=torch.float64) @ (mixing * scales) + \
        torch.randn(width, generator=g, dtype=torch.float64) * 3


def weight(out: int, inp: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("out,inp,ratio", [(64, 64, 0.2), (96, 48, 0.4), (48, 128, 0.6)])
def test_rank_for_ratio_formula(out, inp, ratio):
    rank = rank_for_ratio(out, inp, ratio)
    assert rank == int(out * inp * (1 - ratio) // (out + inp))
    assert low_rank_params(out, inp, rank, bias=False) <= (1 - ratio) * out * inp
    assert low_rank_params(out, inp, rank + 1, bias=False) > (1 - ratio) * out * inp


def test_rank_for_ratio_edges():
    assert rank_for_ratio(4096, 4096, 0.2) == 1638
    assert rank_for_ratio(2, 2, 0.1) is None  # rank 1 would keep 4 of 4 parameters: stays dense
    assert rank_for_ratio(1000, 1000, 0.9999) == 1  # at least 1
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            rank_for_ratio(10, 10, bad)


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
@pytest.mark.parametrize("rank", [4, 16, 31])
def test_whitened_truncation_loss_equals_discarded_singular_values(method, rank):
    """SVD-LLM's theorem: ||(W - W')X^T||_F = sqrt(sum_{i>r} sigma_i(W S)^2)."""
    x = correlated_inputs(800, 48)
    w = weight(40, 48)
    factor = whitening_factor(x.T @ x, method)
    factors = low_rank_factors(w, rank, factor, compute_dtype=torch.float64)
    actual = torch.linalg.norm((w - factors.u @ factors.v) @ x.T)
    sigma = torch.linalg.svdvals(w @ factor.factor)
    expected = sigma[rank:].square().sum().sqrt()
    assert abs(float(actual) - float(expected)) <= 1e-5 * float(expected)
    assert abs(factors.truncation_loss - float(expected)) <= 1e-5 * float(expected)


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_whitened_svd_beats_plain_svd_on_output_error(rank):
    x = correlated_inputs(800, 48)
    w = weight(40, 48)
    whitened = low_rank_factors(w, rank, cholesky_factor(x.T @ x), compute_dtype=torch.float64)
    plain = low_rank_factors(w, rank, None, compute_dtype=torch.float64)
    loss_whitened = torch.linalg.norm((w - whitened.u @ whitened.v) @ x.T)
    loss_plain = torch.linalg.norm((w - plain.u @ plain.v) @ x.T)
    assert loss_whitened < 0.9 * loss_plain
    # and plain SVD is the optimum of the unweighted error
    assert torch.linalg.norm(w - plain.u @ plain.v) <= torch.linalg.norm(w - whitened.u @ whitened.v)


def test_cholesky_and_eigen_whitening_give_the_same_weight():
    x = correlated_inputs(600, 32)
    w = weight(24, 32)
    gram = x.T @ x
    a = low_rank_factors(w, 10, cholesky_factor(gram), compute_dtype=torch.float64)
    b = low_rank_factors(w, 10, eigen_factor(gram), compute_dtype=torch.float64)
    assert torch.allclose(a.u @ a.v, b.u @ b.v, rtol=0, atol=1e-7 * float(w.abs().max()))


def test_factor_splits_sigma_evenly_and_keeps_shapes():
    w = weight(30, 20)
    factors = low_rank_factors(w, 7, None, compute_dtype=torch.float64)
    assert factors.u.shape == (30, 7) and factors.v.shape == (7, 20)
    # u = U sqrt(S), v = sqrt(S) V^T: both carry the same column/row norms
    assert torch.allclose(factors.u.norm(dim=0), factors.v.norm(dim=1), rtol=1e-10)


def test_rank_deficient_gram_takes_the_fallback_and_stays_finite(monkeypatch):
    x = correlated_inputs(20, 64)  # fewer tokens than columns: H has rank 20
    gram = x.T @ x
    eigvalsh = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: pytest.fail("the ladder should suffice"))
    factor = cholesky_factor(gram)
    monkeypatch.setattr(torch.linalg, "eigvalsh", eigvalsh)
    assert factor.fallback
    assert torch.isfinite(factor.factor).all()
    w = weight(32, 64)
    factors = low_rank_factors(w, 8, factor)
    assert torch.isfinite(factors.u).all() and torch.isfinite(factors.v).all()
    assert eigen_factor(gram).fallback
    # the first shift of the ladder is enough for round-off-negative eigenvalues; the factor is
    # taken at that shift + eps (SVD-LLM's margin), without an eigenvalue solve
    eps = 1e-6 * float(gram.diagonal().mean())
    assert factor.shift == pytest.approx(2 * eps, rel=1e-12)
    eye = torch.eye(64, dtype=torch.float64)
    assert torch.allclose(factor.factor @ factor.factor.T, gram + factor.shift * eye, atol=1e-9 * float(gram.abs().max()))
    # a truly indefinite matrix (corrupted statistics) takes SVD-LLM's route: shift = -lambda_min + eps
    lambda_min = -0.01 * float(gram.diagonal().mean())
    indefinite = gram + lambda_min * eye
    true_min = float(torch.linalg.eigvalsh(indefinite)[0])
    shifted = cholesky_factor(indefinite)
    assert shifted.fallback and shifted.shift >= -true_min
    assert shifted.shift == pytest.approx(-true_min + 1e-6 * float(indefinite.diagonal().mean()), rel=1e-6)
    # a healthy Gram takes no fallback
    x = correlated_inputs(400, 64)
    assert not cholesky_factor(x.T @ x).fallback


def test_statistics_accumulate_gram_and_channel_stats_exactly():
    x = correlated_inputs(300, 16).float()
    stats = InputStatistics(16, "cpu")
    for chunk in x.split(70):
        stats.add_batch(chunk[None])  # (batch, tokens, width) like a decoder layer input
    reference = x.double().T @ x.double()
    assert stats.tokens == 300
    assert torch.allclose(stats.gram, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    assert torch.allclose(stats.abs_sum / 300, x.abs().double().mean(0), rtol=1e-5)
    assert torch.equal(stats.abs_max, x.abs().amax(0))


def drifted_problem(seed: int = 0):
    """A compressed layer whose inputs drifted from the calibration inputs used for whitening."""
    x_orig = correlated_inputs(600, 32, seed)
    x_drift = x_orig + 0.3 * correlated_inputs(600, 32, seed + 7)
    w = weight(24, 32, seed + 3)
    factors = low_rank_factors(w, 8, cholesky_factor(x_orig.T @ x_orig), compute_dtype=torch.float64)
    return w, factors.u, factors.v, x_drift


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_update_wins_back_the_drift_on_held_out_inputs(seed):
    """On inputs that drifted from the whitening data, the refit u reaches the least-squares
    optimum on the fit tokens, and on held-out tokens of the same drift it removes a measured
    share of the error (not merely "no increase", which the acceptance gate guarantees)."""
    w, u, v, x = drifted_problem(seed)
    fit, holdout = x[:450], x[450:]
    result = update_u(w, u, v, fit.T @ fit, holdout.T @ holdout)
    assert result.accepted and result.ridge == 1e-6
    optimum = torch.linalg.lstsq(fit @ v.T, fit @ w.T).solution.T
    best = float(torch.linalg.norm((w - optimum @ v) @ fit.T) ** 2)
    assert result.fit_error_after == pytest.approx(best, rel=1e-5)
    before = float(torch.linalg.norm((w - u @ v) @ holdout.T))
    after = float(torch.linalg.norm((w - result.u @ v) @ holdout.T))
    assert after < 0.9 * before
    # the error computed from Grams is the real one
    direct = torch.linalg.norm((w - u @ v) @ fit.T) ** 2
    assert abs(output_error(w, u, v, fit.T @ fit) - float(direct)) <= 1e-8 * float(direct)


def test_closed_form_update_with_fewer_tokens_than_the_rank_raises_the_ridge():
    """5 tokens for rank 8: v H v^T is singular; the solve takes a larger ridge instead of failing."""
    w, u, v, x = drifted_problem(3)
    fit = x[:5]
    candidate, ridge = closed_form_u(w, v, fit.T @ fit, ridge=0.0)
    assert candidate is not None and torch.isfinite(candidate).all() and 0 < ridge <= 1e-2
    result = update_u(w, u, v, fit.T @ fit, x[450:].T @ x[450:])
    assert torch.isfinite(result.u).all() and result.ridge >= 1e-6


def _held_out_error(w, u, v, x) -> float:
    return float(torch.linalg.norm((w - u @ v) @ x.T) ** 2)


def test_update_that_raises_the_held_out_error_is_rejected_and_u_kept_bit_for_bit():
    """Held-out inputs in the null space of W - u v: the current u is exact on them, so the u fitted
    to the drifted tokens must raise their error, although it lowers the fit error: rejected."""
    w, u, v, x = drifted_problem(2)
    fit = x[:450]
    null = torch.linalg.svd(w - u @ v).Vh[24:]  # W - u v is 24 x 32: 8 directions it maps to 0
    holdout = torch.randn(200, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) @ null
    before = _held_out_error(w, u, v, holdout)
    candidate, _ = closed_form_u(w, v, fit.T @ fit)
    assert before < 1e-20 and _held_out_error(w, candidate, v, holdout) > 1e-3  # the fitted u hurts there
    assert _held_out_error(w, candidate, v, fit) < 0.9 * _held_out_error(w, u, v, fit)  # and helps on the fit
    result = update_u(w, u, v, fit.T @ fit, holdout.T @ holdout)
    assert not result.accepted and torch.equal(result.u, u)


def test_update_that_lowers_the_held_out_error_is_kept():
    """The same fit, held-out tokens of the fit's own (drifted) distribution: the fitted u is taken."""
    w, u, v, x = drifted_problem(2)
    fit, holdout = x[:450], x[450:]
    result = update_u(w, u, v, fit.T @ fit, holdout.T @ holdout)
    candidate, _ = closed_form_u(w, v, fit.T @ fit)
    assert result.accepted and torch.equal(result.u, candidate)
    assert _held_out_error(w, result.u, v, holdout) < 0.9 * _held_out_error(w, u, v, holdout)


def test_low_rank_module_refuses_factors_that_do_not_fit_its_dtype():
    from component import LowRankLinear
    u, v = torch.ones(6, 2, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
    module = LowRankLinear.from_factors(u, v, None, torch.float16, "cpu")
    assert torch.equal(module.weight_product, torch.full((6, 4), 2.0, dtype=torch.float16))
    with pytest.raises(ValueError, match="do not fit in torch.float16"):
        LowRankLinear.from_factors(u * 7e4, v, None, torch.float16, "cpu")  # 70000 > 65504
    with pytest.raises(ValueError, match="do not fit"):
        LowRankLinear.from_factors(u * float("nan"), v, None, torch.float32, "cpu")
    LowRankLinear.from_factors(u * 7e4, v, None, torch.bfloat16, "cpu")  # bfloat16 has the range
