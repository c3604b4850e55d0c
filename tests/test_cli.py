"""The CLI's own promises: --help shows every default and its examples run as written; sizes mean
what they say (--model_ratio); long passes are announced with an estimate before they start."""
import argparse
import os
import re
import shlex

import pytest

import compress
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m")))


# ------------------------------------------------------------------ --model_ratio

def test_model_ratio_removes_that_fraction_of_the_whole_model(tiny_dir, tmp_path, capsys):
    from utils.io import load_compressed
    from utils.model import count_parameters, load_model, target_shapes
    original, _ = load_model(tiny_dir)
    total, shapes = count_parameters(original), target_shapes(original)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "3", "--model", tiny_dir, "--model_ratio", "0.3", "--whitening", "none",
                          "--save_path", out, "--device", "cpu"]) == 0
    model, _, block = load_compressed(out)
    removed = 1 - count_parameters(model) / total  # counted on the saved model, not read from its record
    rank_step = sum(m + n for m, n, _ in shapes.values()) / total  # every matrix one rank more or less
    assert abs(removed - 0.3) <= rank_step, (removed, rank_step)
    assert block["ratio"] > 0.3  # the per-matrix ratio it took is larger: the embeddings stay dense
    assert block["model_ratio"]["asked"] == 0.3 and block["model_ratio"]["ratio"] == block["ratio"]
    printed = capsys.readouterr().out
    assert f"per-matrix ratio {block['ratio']}" in printed and f"{removed:.1%} removed" in printed
    assert re.search(r"\d+\.\d MiB on disk", printed)


def test_model_ratio_conversion_matches_the_uniform_plan():
    from utils.architecture import ratio_for_model_fraction
    from utils.plan import Plan
    shapes = {f"l{i}.{k}": (m, n, False) for i in range(4) for k, (m, n) in
              {"q": (512, 512), "up": (1408, 512), "down": (512, 1408)}.items()}
    total = sum(m * n for m, n, _ in shapes.values()) + 4000 * 512  # layers 77% of the model
    for fraction in (0.1, 0.25, 0.4):
        ratio = ratio_for_model_fraction(shapes, total, fraction)
        plan = Plan.uniform(shapes, ratio)
        removed = (plan.params_before() - plan.params_after()) / total
        assert abs(removed - fraction) <= sum(m + n for m, n, _ in shapes.values()) / total
    with pytest.raises(ValueError, match="unreachable"):
        ratio_for_model_fraction(shapes, total, 0.8)


# ------------------------------------------------------------------ costs said before the wait

def test_sensitivity_pass_is_estimated_before_it_starts_and_recorded(tiny_dir, tmp_path, capsys, monkeypatch):
    import json

    import methods.sensitivity as sensitivity
    printed_before = []
    original = sensitivity.sensitivity_table

    def watched(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)  # everything printed before the pass starts
        return original(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "sensitivity_table", watched)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "1-2", "--model", tiny_dir, "--allocation", "duo", "--ratio", "0.3",
                          "--dataset", "random", "--whitening_nsamples", "4", "--model_seq_len", "16",
                          "--sensitivity_nsamples", "8", "--sensitivity_seq_len", "300", "--save_path", out,
                          "--device", "cpu"]) == 0
    line = next(l for l in printed_before[0].splitlines() if l.startswith("sensitivity pass (kl): about"))
    assert "14 matrices x 10 candidates x 8 windows" in line  # the tiny llama: 2 layers x 7 linears
    assert "one window of 300 tokens" in line  # --sensitivity_seq_len, not --model_seq_len
    for flag in ("--sensitivity_nsamples 2", "--sensitivity_ratios 0.25,0.5,0.75,1", "--sensitivity_seq_len 128"):
        assert flag in line, line
    with open(os.path.join(out, "stats", "plan_0.3.json")) as handle:
        detail = json.load(handle)["detail"]
    cost = detail["sensitivity_cost"]
    assert cost["counts"] == {"matrices": 14, "candidates": 10, "windows": 8}
    assert cost["estimated_s"] > 0 and cost["actual_s"] > 0 and detail["sensitivity_seq_len"] == 300
    with open(os.path.join(out, "stats", "meta.json")) as handle:
        profile = json.load(handle)["cost"]["profile"]
    assert profile["counts"] == {"windows": 4} and profile["actual_s"] > 0


def test_refinement_is_estimated_before_it_starts_and_recorded(tiny_dir, tmp_path, capsys, monkeypatch):
    import utils.pipeline as pipeline
    from utils.io import load_compressed
    printed_before = []
    original = pipeline.compress_model

    def watched(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compress_model", watched)
    out = str(tmp_path / "out")
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--dataset", "random",
                          "--model_seq_len", "16", "--refine", "gradient", "--refine_epochs", "3",
                          "--refine_nsamples", "4", "--save_path", out, "--device", "cpu"]) == 0
    line = next(l for l in printed_before[0].splitlines() if l.startswith("refinement (block): about"))
    assert "2 layers x 3 epochs x 4 windows" in line and "--refine_epochs 1" in line
    cost = load_compressed(out)[2]["cost"]["refine"]
    assert cost["counts"] == {"layers": 2, "epochs": 3, "windows": 4} and cost["actual_s"] > 0


def test_estimate_is_counts_times_the_timed_unit():
    from utils.cost import estimate
    e = estimate("pass", {"matrices": 210, "candidates": 10, "windows": 16}, "one window", 0.5, 0.5,
                 [("--sensitivity_nsamples 4", 0.25), ("--not-cheaper 1", 1.0)])
    assert e.seconds == pytest.approx(210 * 10 * 16 * 0.5 * 0.5)
    assert e.message().startswith("pass: about 2.3 h = 210 matrices x 10 candidates x 16 windows")
    assert "--sensitivity_nsamples 4 (about 35 min)" in e.message() and "--not-cheaper" not in e.message()
    assert e.record(12.0)["estimated_s"] == pytest.approx(8400.0) and e.record(12.0)["actual_s"] == 12.0
