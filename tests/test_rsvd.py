"""Randomized SVD (utils/rsvd.py): accuracy against the exact SVD, orthonormality, fallback, seeds."""
from __future__ import annotations

import pytest
import torch

from utils.gram import add_symmetric_gram, symmetric_gram
from utils.rsvd import _gram_route, randomized_svd, route_cost


def decaying(m: int, n: int, alpha: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q1 diag(s) Q2^T with s_i = i^-alpha (float32) and its exact singular values (float64)."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64).pow(-alpha)
    return ((q1 * s) @ q2.T).float(), s


def residual(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - (u.double() * s.double()) @ vh.double()))


@pytest.mark.parametrize("route", ["auto", "direct", "gram"])
def test_n_iter_2_within_one_percent_of_exact_on_decaying_spectrum(route):
    for m, n, rank in ((400, 300, 60), (300, 500, 30)):
        a, s = decaying(m, n, alpha=1.0)
        optimum = float(s[rank:].square().sum().sqrt())
        u, sigma, vh = randomized_svd(a, rank, oversamples=10, n_iter=2,
                                      generator=torch.Generator().manual_seed(0), route=route)
        assert u.shape == (m, rank) and sigma.shape == (rank,) and vh.shape == (rank, n)
        exact_u, exact_s, exact_vh = torch.linalg.svd(a, full_matrices=False)
        exact = residual(a, exact_u[:, :rank], exact_s[:rank], exact_vh[:rank])
        assert abs(exact / optimum - 1) < 1e-4
        assert residual(a, u, sigma, vh) <= 1.01 * exact
        # leading singular values are accurate; those near the cutoff may be a few percent low
        assert torch.allclose(sigma[:rank // 2].double(), s[:rank // 2], rtol=0.01)
        assert (sigma.double() <= s[:rank] * (1 + 1e-5)).all()


@pytest.mark.parametrize("route", ["direct", "gram"])
@pytest.mark.parametrize("shape", [(350, 250), (250, 350)])
def test_outputs_are_orthonormal_and_sorted(route, shape):
    a, _ = decaying(*shape, alpha=0.6, seed=1)
    u, sigma, vh = randomized_svd(a, 80, oversamples=10, n_iter=2, generator=torch.Generator().manual_seed(3),
                                  route=route)
    assert u.shape == (shape[0], 80) and vh.shape == (80, shape[1])
    eye = torch.eye(80)
    assert torch.allclose(u.T @ u, eye, atol=1e-4)
    assert torch.allclose(vh @ vh.T, eye, atol=1e-4)
    assert (sigma[:-1] >= sigma[1:]).all() and (sigma > 0).all()
    assert u.dtype == sigma.dtype == vh.dtype == torch.float32


def test_exact_fallback_when_sketch_covers_the_matrix():
    a, _ = decaying(120, 40, seed=2)
    for rank, oversamples in ((35, 10), (40, 0), (30, 10)):
        u, sigma, vh = randomized_svd(a, rank, oversamples=oversamples, n_iter=2,
                                      generator=torch.Generator().manual_seed(0))
        eu, es, evh = torch.linalg.svd(a, full_matrices=False)
        assert torch.equal(sigma, es[:rank])
        assert torch.equal(u, eu[:, :rank]) and torch.equal(vh, evh[:rank])


def test_seeded_runs_reproduce_and_seeds_differ():
    a, _ = decaying(200, 150, seed=4)
    first = randomized_svd(a, 20, 5, 1, torch.Generator().manual_seed(7))
    again = randomized_svd(a, 20, 5, 1, torch.Generator().manual_seed(7))
    other = randomized_svd(a, 20, 5, 1, torch.Generator().manual_seed(8))
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("route", ["direct", "gram"])
def test_rank_deficient_matrix_gives_finite_exact_product(route):
    """The Gram route cannot resolve sigma below ~3e-4 sigma_1 and hands over to the direct route."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(150, 6, generator=g) @ torch.randn(6, 120, generator=g)  # rank 6
    u, sigma, vh = randomized_svd(a, 20, oversamples=10, n_iter=2, generator=torch.Generator().manual_seed(0),
                                  route=route)
    assert torch.isfinite(u).all() and torch.isfinite(sigma).all() and torch.isfinite(vh).all()
    assert residual(a, u, sigma, vh) <= 1e-4 * float(torch.linalg.norm(a))


@pytest.mark.parametrize("route", ["direct", "gram"])
def test_n_iter_0_and_power_iterations_improve_accuracy(route):
    a, s = decaying(300, 300, alpha=0.6, seed=6)
    rank = 100
    optimum = float(s[rank:].square().sum().sqrt())
    excess = [residual(a, *randomized_svd(a, rank, 10, q, torch.Generator().manual_seed(0), route)) / optimum - 1
              for q in (0, 2, 4)]
    assert excess[0] > excess[1] > excess[2] >= -1e-6


def test_gram_route_declines_only_unresolved_ranks():
    """It returns None (and randomized_svd takes the direct route) exactly when the kept rank
    reaches below what a float32 Gram resolves."""
    a, _ = decaying(300, 200, alpha=0.6, seed=9)
    assert _gram_route(a, 50, 60, 2, torch.Generator().manual_seed(0)) is not None
    g = torch.Generator().manual_seed(5)
    low = torch.randn(150, 6, generator=g) @ torch.randn(6, 120, generator=g)  # rank 6
    assert _gram_route(low, 20, 30, 2, torch.Generator().manual_seed(0)) is None


def test_gram_route_resolution_follows_the_working_precision():
    """A sketch reaching sigma = 1e-4 sigma_1 is below what a float32 Gram resolves, not a float64 one."""
    g = torch.Generator().manual_seed(10)
    q1, _ = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -6, 200, dtype=torch.float64)  # sigma_60 ~ 1.5e-2, sigma_70 ~ 8e-3 ... 1e-6
    a = (q1 * s) @ q2.T
    rank, width = 100, 110  # sigma_110 = 1.7e-4
    assert _gram_route(a.float(), rank, width, 2, torch.Generator().manual_seed(0)) is None
    u, sigma, vh = _gram_route(a, rank, width, 2, torch.Generator().manual_seed(0))
    optimum = float(s[rank:].square().sum().sqrt())
    assert residual(a, u, sigma, vh) <= 1.01 * optimum


def test_routes_find_the_same_subspace():
    """Both routes are the same subspace iteration: q power iterations on A span what G^(q+1) Omega
    spans, so their truncation errors agree closely (not exactly: different round-off and sketches)."""
    a, s = decaying(500, 200, alpha=0.8, seed=7)
    errors = [residual(a, *randomized_svd(a, 60, 10, 3, torch.Generator().manual_seed(0), route))
              for route in ("direct", "gram")]
    assert abs(errors[0] / errors[1] - 1) < 2e-3


def test_gram_route_kept_energy_is_exact_for_its_subspace():
    """sigma_i = ||A v_i||, so ||A||^2 - sum sigma^2 is exactly the squared truncation error."""
    a, _ = decaying(400, 250, alpha=0.6, seed=8)
    u, sigma, vh = randomized_svd(a, 70, 10, 2, torch.Generator().manual_seed(0), route="gram")
    reported = (a.double().square().sum() - sigma.double().square().sum()).sqrt()
    assert abs(float(reported) / residual(a, u, sigma, vh) - 1) < 1e-4
    assert (sigma[:-1] >= sigma[1:]).all()


def test_auto_route_follows_the_cost_model():
    # compression-sized ranks on an LLM shape: the Gram route needs far fewer multiply-adds
    cost = route_cost(11008, 4096, 2388, 2398, 4)
    assert cost["gram"] < 0.5 * cost["direct"]
    # a thin sketch of a big matrix: forming the Gram would dominate, direct wins
    cost = route_cost(4096, 4096, 20, 30, 2)
    assert cost["direct"] < cost["gram"]


def test_unknown_route_is_refused():
    with pytest.raises(ValueError, match="route"):
        randomized_svd(torch.randn(20, 10), 3, route="gramm")


@pytest.mark.parametrize("shape,block", [((300, 100), 16), ((50, 130), 32), ((64, 40), 512)])
def test_symmetric_gram_matches_the_plain_product(shape, block):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    gram = symmetric_gram(x, block)
    reference = x.double().T @ x.double()
    assert torch.allclose(gram, gram.T, rtol=0, atol=1e-6 * float(gram.abs().max()))
    assert float((gram.double() - reference).abs().max() / reference.abs().max()) < 1e-6


@pytest.mark.parametrize("shape,block", [((300, 100), 16), ((50, 130), 32), ((64, 40), 512)])
def test_add_symmetric_gram_adds_exactly_what_symmetric_gram_makes(shape, block):
    """The in-place sum (step 1's accumulation on the CPU) is bit for bit the product's, added."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=generator)
    start = torch.randn(shape[1], shape[1], generator=generator, dtype=torch.float64)
    out = start.clone()
    add_symmetric_gram(out, x, block)
    assert torch.equal(out, start + symmetric_gram(x, block))


def test_low_rank_factors_take_the_exact_svd_when_the_sketch_covers_the_matrix():
    """rank + oversamples >= min(m, n): the rsvd request goes through exact_svd (driver choice and check)."""
    from utils.decompose import low_rank_factors
    a, _ = decaying(120, 40, seed=11)
    exact = low_rank_factors(a, 30, decomposition="svd")
    covered = low_rank_factors(a, 30, decomposition="rsvd", oversamples=10)
    assert covered.svd is not None and covered.svd.driver == "default"
    assert torch.equal(covered.u, exact.u) and torch.equal(covered.v, exact.v)
    assert low_rank_factors(a, 20, decomposition="rsvd", oversamples=10).svd is None  # a real sketch


def test_bench_rsvd_writes_real_matrices_first_and_measures_excess(tmp_path):
    """The benchmark script: real (whitened) matrices come before the synthetic shapes, so a run
    cut short by a time limit keeps them; every row's excess is against the optimum."""
    import json
    from safetensors.torch import save_file
    from scripts.bench_rsvd import main
    a, _ = decaying(120, 80, seed=1)
    save_file({"layer0.q": a.contiguous()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "r.json"
    assert main(["--shapes", "96x64", "--ratios", "0.4", "--configs", "10:2", "--no_lowrank",
                 "--threads", str(torch.get_num_threads()),  # main() sets the process-wide count
                 "--whitened_file", str(tmp_path / "w.safetensors"), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert list(record["whitened"]) == ["layer0.q"] and list(record["synthetic"]) == ["96x64"]
    for section in ("whitened", "synthetic"):
        for bench in record[section].values():
            for row in bench["runs"]:
                assert 0 <= row["excess"] < 0.05 and abs(row["exact_excess"]) < 1e-5
