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
