"""Step 2's allocations that need sensitivities or spectra (methods/allocation.py): the budget rule,
Duo-SVD's DP against brute force, ASVD's search ending on a feasible bound (ratio and ppl
targets), non-finite sensitivities named, v2's cheap spectra, and the CLI's errors."""
import itertools
import math
import pytest
import torch

from methods.allocation import (asvd_plan, asvd_ppl_plan, duo_plan, v2_plan, whitened_gram_spectrum,
                                whitened_singular_values, whitened_spectra)
from methods.sensitivity import SensitivityOptions, SensitivityTable, measure_sensitivity, plan_calibration_ppl
from utils.allocate import (BUDGET_TOLERANCE, kept_at_threshold, kept_to_ranks, matrix_params, params_after,
                            params_before, sensitivity_order)
from utils.model import target_shapes
from utils.plan import largest_useful_rank



def assert_budget_rule(plan, ratio):
    before, after = plan.params_before(), plan.params_after()
    assert after <= math.floor((1 - ratio) * before), "over the budget"
    assert 1 - after / before <= ratio + BUDGET_TOLERANCE, f"removes {1 - after / before:.4f}, too much"
    for name, module in plan.modules.items():
        if module.rank is not None:
            assert 1 <= module.rank <= largest_useful_rank(module.out_features, module.in_features), name


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_every_allocation_meets_the_budget_rule(profiled_tiny_llama, ratio):
    model, windows, stats = profiled_tiny_llama
    sigmas = whitened_spectra(model, stats, "cpu")
    plan, _ = v2_plan(model, ratio, sigmas)
    assert_budget_rule(plan, ratio)
    duo = measure_sensitivity(model, windows[:2], stats, "cpu", SensitivityOptions("kl", (0.2, 0.5, 0.8, 1.0), ratio),
                              progress=False)
    plan, detail = duo_plan(model, ratio, duo)
    assert_budget_rule(plan, ratio) and plan.allocation == "duo"
    assert detail["dp_removed_fraction"] >= ratio  # the DP itself never goes over either
    ppl = measure_sensitivity(model, windows[:2], stats, "cpu", SensitivityOptions("ppl", (0.2, 0.5, 0.8)),
                              progress=False)
    stable = measure_sensitivity(model, None, None, "cpu", SensitivityOptions("stable_rank", (0.2, 0.5, 0.8)),
                                 progress=False)
    for table in (ppl, stable):
        plan, detail = asvd_plan(model, ratio, table)
        assert_budget_rule(plan, ratio) and plan.allocation == "asvd"
        assert detail["removed_before_fill"] >= ratio


def hand_table(values: dict, base: float) -> SensitivityTable:
    key = {"metric": "kl", "base_state": "uniform ratio 0.4", "candidates": sorted({p for r in values.values() for p in r})}
    return SensitivityTable(key, values, base)


def test_duo_dp_is_optimal_against_brute_force():
    shapes = {"a": (400, 600, False), "b": (300, 300, False), "c": (500, 200, False), "d": (640, 640, False)}
    candidates = (0.2, 0.4, 0.6, 0.8, 1.0)
    torch.manual_seed(3)
    values = {}
    for name in shapes:  # KL falls as more is kept, at a per-matrix rate
        rate = float(torch.rand(()) * 2 + 0.1)
        values[name] = {p: 0.5 + rate * (1 - p) ** 2 + float(torch.rand(()) * 0.01) for p in candidates}
    base = 0.55
    table = hand_table(values, base)
    for ratio in (0.3, 0.45, 0.6):
        plan, detail = duo_plan(shapes, ratio, table, unit=1)
        budget = math.floor((1 - ratio) * params_before(shapes))
        best = math.inf
        names = list(shapes)
        for pick in itertools.product(candidates, repeat=len(names)):
            ranks = kept_to_ranks(shapes, dict(zip(names, pick)))
            if params_after(shapes, ranks) <= budget:
                best = min(best, sum(values[n][p] - base for n, p in zip(names, pick)))
        assert detail["predicted_kl_increase"] == pytest.approx(best, abs=1e-12), ratio
        assert_budget_rule(plan, ratio)


def test_asvd_search_ends_on_the_feasible_bound():
    """The threshold is the largest index whose ranks fit the budget: one more refused choice
    (threshold + 1) would keep too much. ASVD's own loop ends one past that, over the budget."""
    shapes = {f"m{i}": (32 + 8 * i, 48, False) for i in range(6)}
    torch.manual_seed(5)
    values = {n: {p: float(torch.rand(())) for p in (0.1, 0.3, 0.5, 0.7, 0.9)} for n in shapes}
    table = SensitivityTable({"metric": "ppl"}, values, 10.0)
    order = sensitivity_order(values)
    for ratio in (0.25, 0.4, 0.55):
        plan, detail = asvd_plan(shapes, ratio, table)
        t = detail["threshold"]
        budget = math.floor((1 - ratio) * params_before(shapes))

        def cost(index):
            return params_after(shapes, kept_to_ranks(shapes, kept_at_threshold(order, list(shapes), index)))

        assert cost(t) <= budget < cost(t + 1)
        assert_budget_rule(plan, ratio)
        # ASVD's loop (binary_search.py, kept-fraction target) for comparison: it ends on low
        low, high = 0, len(order) - 1
        while low < high:
            mid = (low + high) // 2
            if cost(mid) > budget:
                high = mid
            else:
                low = mid + 1
        assert low == t + 1 and cost(low) > budget  # the defect the search fixes


def test_asvd_ppl_target_ends_on_a_feasible_bound():
    shapes = {f"m{i}": (48, 48, False) for i in range(5)}
    torch.manual_seed(7)
    values = {n: {p: float(torch.rand(())) for p in (0.2, 0.4, 0.6, 0.8)} for n in shapes}
    table = SensitivityTable({"metric": "ppl"}, values, 10.0)
    calls = []

    def fake_ppl(ranks):  # the more removed, the higher; a bump makes it non-monotone in places
        removed = 1 - params_after(shapes, ranks) / params_before(shapes)
        calls.append(removed)
        return 10 + 40 * removed ** 2 + (1.5 if 0.30 < removed < 0.33 else 0.0)

    for target in (12.0, 20.0, 30.0):
        calls.clear()
        plan, detail = asvd_ppl_plan(shapes, target, table, fake_ppl)
        assert detail["calibration_ppl"] < target
        t = detail["threshold"]
        assert detail["evaluations"][str(t)]["ppl"] < target
        if t > 0:  # the bracket's other end was evaluated and is infeasible
            assert str(t - 1) in detail["evaluations"] and detail["evaluations"][str(t - 1)]["ppl"] >= target
        assert len(calls) <= math.ceil(math.log2(len(sensitivity_order(values)) + 1)) + 1
        assert plan.removed_fraction() > 0
    with pytest.raises(ValueError, match="already above it"):
        asvd_ppl_plan(shapes, 9.0, table, fake_ppl)


def test_ppl_target_search_on_a_model(profiled_tiny_llama):
    model, windows, stats = profiled_tiny_llama
    table = measure_sensitivity(model, windows[:2], stats, "cpu", SensitivityOptions("ppl", (0.3, 0.6, 0.9)),
                                progress=False)
    evaluate = plan_calibration_ppl(model, stats, windows[:2], "cpu")
    target = table.base_value * 1.002
    plan, detail = asvd_ppl_plan(model, target, table, evaluate)
    assert detail["calibration_ppl"] < target
    assert evaluate(plan.ranks) == pytest.approx(detail["calibration_ppl"], rel=1e-6)  # the real perplexity


def test_non_finite_sensitivity_is_an_error_naming_the_matrix():
    shapes = {"layer.q": (32, 32, False), "layer.k": (16, 32, False)}
    values = {"layer.q": {0.2: 1.0, 0.6: 0.5}, "layer.k": {0.2: float("nan"), 0.6: 0.1}}
    with pytest.raises(ValueError, match=r"layer\.k at kept fraction 0\.2"):
        asvd_plan(shapes, 0.4, SensitivityTable({"metric": "ppl"}, values, 1.0))
    values["layer.k"][1.0] = 0.0
    with pytest.raises(ValueError, match=r"layer\.k at kept fraction 0\.2"):
        duo_plan(shapes, 0.4, hand_table(values, 0.3))


@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (33, 33)])
def test_v2_spectra_from_the_smaller_gram_equal_svdvals(shape):
    torch.manual_seed(0)
    target = torch.randn(*shape, dtype=torch.float64) @ torch.diag(torch.logspace(0, -6, shape[1], dtype=torch.float64))
    fast = whitened_singular_values(target)
    exact = torch.linalg.svdvals(target)
    assert fast.shape == exact.shape
    assert torch.allclose(fast, exact, rtol=1e-6, atol=1e-7 * float(exact[0]))
    top = float(exact[0]) ** 2
    for r in (1, shape[0] // 3, min(shape) - 1):  # what v2 uses: the discarded energy, to ~1e-16 of sigma_1^2
        assert float(fast[r:].square().sum()) == pytest.approx(float(exact[r:].square().sum()), rel=1e-6,
                                                               abs=1e-14 * top)


def test_v2_spectra_pass_matches_svdvals_on_a_model(profiled_tiny_llama):
    """The Gram route (no factorisation of H for wide matrices, float32 products) gives the
    singular values and the truncation losses the SVD of W S gives."""
    model, _, stats = profiled_tiny_llama
    fast = whitened_spectra(model, stats, "cpu")
    exact = whitened_spectra(model, stats, "cpu", method="svdvals")
    shapes = target_shapes(model)
    assert any(m > n for m, n, _ in shapes.values()) and any(m < n for m, n, _ in shapes.values())
    for name in fast:
        top = float(exact[name][0])
        assert torch.allclose(fast[name], exact[name], rtol=1e-3, atol=1e-3 * top), name
        r = len(exact[name]) // 2
        # 1%: these Grams of 64 tokens are singular, so step 3's factor is of H + shift I (see the docstring)
        assert float(fast[name][r:].square().sum()) == pytest.approx(float(exact[name][r:].square().sum()), rel=1e-2)


def test_whitened_gram_spectrum_equals_the_svd_of_w_s():
    from utils.whitening import whitening_factor
    torch.manual_seed(1)
    x = torch.randn(300, 48, dtype=torch.float64) * torch.logspace(0, -2, 48, dtype=torch.float64)
    gram = (x.T @ x).float()
    for shape in ((30, 48), (80, 48), (48, 48)):
        weight = torch.randn(*shape)
        exact = torch.linalg.svdvals(whitening_factor(gram, "cholesky").right_multiply(weight))
        fast = whitened_gram_spectrum(weight, gram, "cholesky")
        assert torch.allclose(fast, exact, rtol=1e-4, atol=1e-5 * float(exact[0])), shape


@pytest.mark.parametrize("extra, message", [
    (["--allocation", "v2", "--strategy", "dp"], "--strategy dp is Duo-SVD's DP allocation"),
    (["--allocation", "asvd", "--param_ratio_target", "1.5"], "--param_ratio_target 1.5"),
    (["--allocation", "asvd", "--param_ratio_target", "0.7", "--ratio", "0.5"], "contradicts --ratio 0.5"),
    (["--allocation", "asvd", "--sensitivity_ratios", "0,0.5"], "--sensitivity_ratios: 0 is not a kept fraction"),
    (["--allocation", "asvd", "--sensitivity_ratios", "0.5,x"], "give kept fractions as a comma list"),
    (["--allocation", "duo", "--sensitivity_ratios", "1"], "at least one kept fraction below 1"),
    (["--allocation", "asvd", "--sensitivity_metric", "kl"], "--sensitivity_metric kl is Duo-SVD's"),
    (["--strategy", "dp", "--sensitivity_metric", "ppl"], "--allocation duo measures KL"),
    (["--strategy", "dp", "--ppl_target", "40"], "--ppl_target is ASVD's search"),
    (["--allocation", "asvd", "--ppl_target", "-3"], "--ppl_target -3"),
    (["--sensitivity_metric", "ppl"], "--sensitivity_metric belongs to --allocation asvd or duo"),
    (["--allocation", "duo", "--sensitivity_nsamples", "0"], "--sensitivity_nsamples must be at least 1"),
])
def test_cli_errors_before_slow_work(tmp_path, capsys, extra, message):
    import compress
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "meta.json").write_text("{}")
    code = compress.main(["--step", "2", "--model", "smollm2-135m", "--stats_path", str(stats), "--device", "cpu",
                          *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_cli_duo_then_reuse_then_refuse(tmp_path, capsys):
    """--strategy dp writes a duo plan and its table; a second run reuses the table (the printout
    says reused, even with --overwrite, which replaces the plan); a changed key (other windows)
    is refused with exit 2, naming the field."""
    import json

    import compress
    from tests.tiny_models import save_tiny_model
    model_dir = save_tiny_model("llama", str(tmp_path))
    save = str(tmp_path / "out")
    common = ["--model", model_dir, "--dataset", "random", "--model_seq_len", "16", "--save_path", save,
              "--device", "cpu", "--ratio", "0.4", "--sensitivity_nsamples", "2", "--sensitivity_ratios", "0.3,0.7,1"]
    assert compress.main(["--step", "1-3", "--whitening_nsamples", "4", "--strategy", "dp", *common]) == 0
    assert "sensitivity: measured kl table" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["compression"]["plan"]["allocation"] == "duo"
    assert config["compression"]["plan_source"].endswith("plan_0.4.json")
    assert compress.main(["--step", "2", "--strategy", "dp", "--overwrite", *common]) == 0
    assert "sensitivity: reused kl table" in capsys.readouterr().out
    code = compress.main(["--step", "2", "--strategy", "dp", "--seed", "1", "--plan", str(tmp_path / "p.json"), *common])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: sensitivity table") and "measured with a different windows.seed (0, now 1)" in last


def test_cli_ppl_target_plan_says_what_the_search_assumed_and_step3_measures_the_built_model(tmp_path, capsys):
    """The --ppl_target plan carries the target, the decomposition its candidates were compressed with
    (step 3's flags, here --sigma_fuse U), what it did not apply and its windows; step 3 measures the
    model it builds on those windows against the target: with the searched options it is the searched
    perplexity, with an update step 3 names the difference and records the other number."""
    import json

    import compress
    from tests.tiny_models import save_tiny_model
    model_dir = save_tiny_model("llama", str(tmp_path))
    save = tmp_path / "out"
    common = ["--model", model_dir, "--dataset", "random", "--model_seq_len", "16", "--save_path", str(save),
              "--device", "cpu", "--sigma_fuse", "U"]
    assert compress.main(["--step", "1-3", "--whitening_nsamples", "4", "--allocation", "asvd", "--ppl_target", "1e9",
                          "--sensitivity_nsamples", "2", "--sensitivity_ratios", "0.4,0.8", *common]) == 0
    plan = json.loads((save / "stats" / "plan_0.2.json").read_text())
    search = plan["detail"]["search"]
    assert plan["detail"]["ppl_target"] == 1e9
    assert search["decompose"]["sigma_fuse"] == "U" and search["decompose"]["column_preserve"] is False
    assert "update" in search["not_searched"] and "refinement" in search["not_searched"]
    assert search["windows"] == {"dataset": "random", "nsamples": 2, "seq_len": 16, "seed": 0}
    block = json.loads((save / "config.json").read_text())["compression"]["ppl_target"]
    assert block["target"] == 1e9 and block["met"] is True and block["step3_differs"] == []
    assert block["final_calibration_ppl"] == pytest.approx(block["search_calibration_ppl"], rel=1e-5)
    assert "ppl target 1e+09: the search's calibration perplexity" in capsys.readouterr().out
    assert compress.main(["--step", "3", "--update", "closed_form", "--updating_nsamples", "4", "--overwrite",
                          *common]) == 0
    block = json.loads((save / "config.json").read_text())["compression"]["ppl_target"]
    assert block["step3_differs"] == ["update closed_form"]
    assert block["final_calibration_ppl"] != pytest.approx(block["search_calibration_ppl"], rel=1e-6)
