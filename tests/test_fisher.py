"""ASVD's fisher information (issue 16): the layer-by-layer backward equals a full-model backward."""
from __future__ import annotations

import pytest
import torch

import compress
from methods import DecomposeOptions
from tests.tiny_models import save_tiny_model, tiny_model
from utils.fisher import fisher_information
from utils.model import target_shapes
from pipeline.steps import CompressOptions, Statistics, compress_model, profile_model
from utils.plan import Plan


def brute_force_fisher(model, windows) -> dict[str, torch.Tensor]:
    """sqrt(mean over windows of (dL_w/dW)^2 summed over output rows), one full backward per window."""
    names = list(target_shapes(model))
    sums = {name: 0.0 for name in names}
    for window in windows:
        model.zero_grad()
        model(window[None], labels=window[None], use_cache=False).loss.backward()
        for name in names:
            sums[name] = sums[name] + model.get_submodule(name).weight.grad.square().sum(0)
    model.zero_grad()
    return {name: (total / len(windows)).sqrt() for name, total in sums.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_layerwise_fisher_matches_a_full_backward(family, one_thread):
    model = tiny_model(family).double()
    windows = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    fisher, summary = fisher_information(model, windows, "cpu")
    expected = brute_force_fisher(model, windows)
    assert list(fisher) == list(expected) and summary["windows"] == 3
    for name, value in fisher.items():
        assert value.dtype == torch.float64 and bool(torch.isfinite(value).all()) and bool((value > 0).all())
        error = float((value - expected[name]).abs().max() / expected[name].abs().max())
        assert error < 1e-5, (name, error)
    # the mean of squared per-window gradients, not the square of the mean gradient
    names = list(expected)
    model.zero_grad()
    total = sum(model(w[None], labels=w[None], use_cache=False).loss for w in windows) / len(windows)
    total.backward()
    batched = model.get_submodule(names[0]).weight.grad.square().sum(0).sqrt()
    assert float((batched - fisher[names[0]]).abs().max() / fisher[names[0]].max()) > 1e-2


def test_profile_stores_fisher_and_scaling_uses_it(tmp_path, one_thread):
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "stats")
    stats = profile_model(model, windows, "cpu", path, fisher=True)
    assert stats.meta["fisher"]["windows"] == 3 and stats.meta["fisher"]["seconds"] >= 0
    reopened = Statistics.open(path)
    name = next(iter(target_shapes(model)))
    fisher, _ = fisher_information(model, windows, "cpu")
    assert torch.allclose(reopened.fisher(name), fisher[name])
    plan = Plan.uniform(target_shapes(model), 0.4)
    record = compress_model(model, plan, CompressOptions(DecomposeOptions(whitening="none", scaling="fisher_abs_mean")),
                            "cpu", reopened)
    assert record["scaling"] == "fisher_abs_mean" and len(record["modules"]) == len(plan.ranks)
    stats.close()
    reopened.close()


def test_cli_fisher_scaling_needs_fisher_statistics(tmp_path, capsys):
    tiny = save_tiny_model("llama", str(tmp_path))
    base = ["--model", tiny, "--dataset", "random", "--whitening_nsamples", "2", "--model_seq_len", "16",
            "--device", "cpu", "--save_path", str(tmp_path / "out")]
    assert compress.main(["--step", "1-3", "--scaling", "fisher", *base]) == 2
    assert "--fisher" in capsys.readouterr().err
    assert compress.main(["--step", "1", *base]) == 0
    assert compress.main(["--step", "3", "--scaling", "fisher", *base]) == 2
    assert "rerun step 1 with --fisher" in capsys.readouterr().err
    assert compress.main(["--step", "1-3", "--fisher", "--scaling", "fisher", "--overwrite", *base]) == 0
    assert compress.main(["--step", "3", "--act_aware", "--sigma_fuse", "U", "--overwrite", *base]) == 0


def test_layer_inputs_go_to_disk_and_are_removed(tmp_path, monkeypatch, one_thread):
    """The backward reads each layer's inputs from a file in scratch_dir (every layer's, N x L x d),
    and nothing is left there afterwards."""
    import utils.fisher
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    read = []
    real = torch.load

    def load(path, *args, **kwargs):
        tensor = real(path, *args, **kwargs)
        read.append((str(path).startswith(str(tmp_path)), tuple(tensor.shape)))
        return tensor

    monkeypatch.setattr(utils.fisher.torch, "load", load)
    fisher, _ = fisher_information(model, windows, "cpu", scratch_dir=str(tmp_path))
    assert read == [(True, (3, 16, 64))] * 2  # two decoder layers, read top down
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    expected = brute_force_fisher(model, windows)
    assert all(float((fisher[n] - expected[n]).abs().max() / expected[n].abs().max()) < 1e-4 for n in expected)
