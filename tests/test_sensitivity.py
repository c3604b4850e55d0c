"""methods/sensitivity.py: the KL (Duo-SVD) and perplexity (ASVD) sensitivities checked against
whole-model forward passes, the table's key and cache, stable_rank without a forward pass."""
import json
import math

import pytest
import torch

import methods.sensitivity as sensitivity
from methods.sensitivity import (SensitivityError, SensitivityOptions, candidate_rank, measure_sensitivity,
                                 sensitivity_table)
from tests.tiny_models import tiny_model
from utils.model import decoder_layers, target_shapes
from pipeline.steps import CompressOptions, compress_model, profile_model
from utils.plan import ModulePlan, Plan, rank_for_ratio



def compressed_logits(model, stats, windows, ranks):
    """Logits of a copy of `model` with the given ranks (step 3's whitened SVD), window by window."""
    import copy
    shapes = target_shapes(model)
    plan = Plan({n: ModulePlan(m, k, b, ranks.get(n)) for n, (m, k, b) in shapes.items()}, None)
    compressed = copy.deepcopy(model)
    if plan.ranks:
        compress_model(compressed, plan, CompressOptions(), "cpu", stats)
    with torch.no_grad():
        return torch.cat([compressed(windows[w:w + 1]).logits for w in range(windows.shape[0])])


class ForwardCounter:
    """Counts calls of every decoder layer and of the output head."""

    def __init__(self, model):
        self.calls = 0
        modules = list(decoder_layers(model)) + [model.get_output_embeddings()]
        self.handles = [m.register_forward_pre_hook(self.hook) for m in modules]

    def hook(self, *_):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


def test_kl_matches_whole_model_forward(profiled_tiny_llama):
    """value(name, p) = mean over tokens of KL(original || model with every matrix at the uniform
    rank of 0.4 but `name` at kept fraction p), computed here with whole-model forwards."""
    model, windows, stats = profiled_tiny_llama
    windows = windows[:2]
    table = measure_sensitivity(model, windows, stats, "cpu", SensitivityOptions("kl", (0.2, 0.9, 1.0), 0.4),
                                progress=False)
    shapes = target_shapes(model)
    base = {n: rank_for_ratio(m, k, 0.4) for n, (m, k, _) in shapes.items()}
    with torch.no_grad():
        original = torch.log_softmax(torch.cat([model(windows[w:w + 1]).logits for w in range(2)]), -1)

    def kl(ranks):
        q = torch.log_softmax(compressed_logits(model, stats, windows, ranks), -1)
        return float((original.exp() * (original - q)).sum(-1).mean())

    assert table.base_value == pytest.approx(kl(base), rel=1e-4)
    assert table.base_value > 0
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        m, k, _ = shapes[name]
        for p in (0.2, 0.9, 1.0):
            expected = kl({**base, name: candidate_rank(m, k, p)})
            assert table.values[name][p] == pytest.approx(expected, rel=1e-4, abs=1e-9), (name, p)
        assert table.values[name][0.6] == table.base_value  # the base state is a candidate (as the reference)
    # the first layer's matrices move the KL most at 0.2: the values are not all alike
    assert table.values["model.layers.0.self_attn.k_proj"][0.2] != table.values["model.layers.0.self_attn.k_proj"][1.0]


def test_ppl_matches_whole_model_forward(profiled_tiny_llama):
    model, windows, stats = profiled_tiny_llama
    windows = windows[:2]
    table = measure_sensitivity(model, windows, stats, "cpu", SensitivityOptions("ppl", (0.3, 0.7)), progress=False)

    def ppl(ranks):
        logits = compressed_logits(model, stats, windows, ranks)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                windows[:, 1:].reshape(-1))
        return math.exp(float(nll))

    assert table.base_value == pytest.approx(ppl({}), rel=1e-5)
    shapes = target_shapes(model)
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.o_proj"):
        m, k, _ = shapes[name]
        for p in (0.3, 0.7):
            assert table.values[name][p] == pytest.approx(ppl({name: candidate_rank(m, k, p)}), rel=1e-5)


def test_model_left_unchanged(profiled_tiny_llama):
    model, windows, stats = profiled_tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(windows[:1]).logits
    measure_sensitivity(model, windows[:1], stats, "cpu", SensitivityOptions("kl", (0.5, 1.0), 0.3), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(windows[:1]).logits, logits)
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in decoder_layers(model))


@pytest.mark.parametrize("family", ["gemma3", "opt", "qwen2"])
def test_other_families_match_their_own_forward(family):
    """The head runs through the model's own forward (final norm, soft-capping, OPT's projection):
    with every matrix dense the ppl base value is the model's own perplexity."""
    model = tiny_model(family)
    windows = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    stats = profile_model(model, windows, "cpu")
    table = measure_sensitivity(model, windows, stats, "cpu", SensitivityOptions("ppl", (0.5,)), progress=False)
    with torch.no_grad():
        logits = torch.cat([model(windows[w:w + 1]).logits for w in range(2)])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert table.base_value == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert len(table.values) == len(target_shapes(model))


def test_cache_reused_without_forward_and_refused_when_key_differs(profiled_tiny_llama, tmp_path):
    model, windows, stats = profiled_tiny_llama
    path = str(tmp_path / "sensitivity.json")
    options = SensitivityOptions("kl", (0.5, 1.0), 0.4)
    table, reused = sensitivity_table(model, windows[:2], stats, "cpu", options, path, {"dataset": "random"},
                                      progress=False)
    assert not reused and table.evaluations > 0
    counter = ForwardCounter(model)
    try:
        again, reused = sensitivity_table(model, windows[:2], stats, "cpu", options, path, {"dataset": "random"},
                                          progress=False)
    finally:
        counter.close()
    assert reused and counter.calls == 0
    assert again.values == table.values and again.base_value == table.base_value
    # a change of windows, candidates, base state or metric is refused, naming the field
    cases = [
        (windows[2:4], options, "windows.ids_sha1"),
        (windows[:2], SensitivityOptions("kl", (0.4, 1.0), 0.4), "candidates"),
        (windows[:2], SensitivityOptions("kl", (0.5, 1.0), 0.2), "candidates"),  # base 0.8 joins the candidates
        (windows[:2], SensitivityOptions("ppl", (0.5, 0.6, 1.0)), "metric"),
    ]
    for wins, opts, field in cases:
        with pytest.raises(SensitivityError, match=f"different {field}"):
            sensitivity_table(model, wins, stats, "cpu", opts, path, {"dataset": "random"}, progress=False)
    with pytest.raises(SensitivityError, match="different windows.dataset"):
        sensitivity_table(model, windows[:2], stats, "cpu", options, path, {"dataset": "pydoc"}, progress=False)
    other_stats = profile_model(model, windows[1:3], "cpu")
    with pytest.raises(SensitivityError, match="different statistics"):
        sensitivity_table(model, windows[:2], other_stats, "cpu", options, path, {"dataset": "random"}, progress=False)
    other_model = tiny_model("llama", seed=1)  # same architecture: the statistics hash still differs
    with pytest.raises(SensitivityError, match="different"):
        sensitivity_table(other_model, windows[:2], stats, "cpu", options, path, {"dataset": "random"},
                          progress=False)
    # overwrite: a matching table is still reused, a different one measured anew
    _, reused = sensitivity_table(model, windows[:2], stats, "cpu", options, path, {"dataset": "random"},
                                  overwrite=True, progress=False)
    assert reused
    _, reused = sensitivity_table(model, windows[:2], stats, "cpu", SensitivityOptions("kl", (0.4, 1.0), 0.4), path,
                                  {"dataset": "random"}, overwrite=True, progress=False)
    assert not reused


def test_stable_rank_needs_no_forward_pass(profiled_tiny_llama):
    model, windows, stats = profiled_tiny_llama
    counter = ForwardCounter(model)
    try:
        table, _ = sensitivity_table(model, None, None, "cpu", SensitivityOptions("stable_rank", (0.2, 0.5)),
                                     progress=False)
    finally:
        counter.close()
    assert counter.calls == 0 and table.evaluations == 0
    weight = model.model.layers[1].mlp.up_proj.weight.detach()
    s = torch.linalg.svdvals(weight)
    sr = float(s.square().sum().sqrt() / s[0])
    row = table.values["model.layers.1.mlp.up_proj"]
    assert row[0.5] == pytest.approx(-sr * 0.5 ** 0.1, rel=1e-5)
    assert row[0.2] == pytest.approx(-sr * 0.2 ** 0.1, rel=1e-5)


def test_non_finite_sensitivity_names_the_matrix(profiled_tiny_llama, monkeypatch, tmp_path):
    model, windows, stats = profiled_tiny_llama
    real = sensitivity._nll_sum
    calls = {"n": 0}

    def poisoned(logits, ids):
        calls["n"] += 1
        value = real(logits, ids)
        return value * float("nan") if calls["n"] == 3 else value  # base value: calls 1-2 (2 windows)

    monkeypatch.setattr(sensitivity, "_nll_sum", poisoned)
    with pytest.raises(SensitivityError, match=r"model\.layers\.0\.self_attn\.q_proj at kept fraction 0\.5"):
        measure_sensitivity(model, windows[:2], stats, "cpu", SensitivityOptions("ppl", (0.5,)), progress=False)
    monkeypatch.setattr(sensitivity, "_nll_sum", real)
    # a table on disk with a NaN (JSON NaN written by another tool) is refused, naming it
    path = tmp_path / "t.json"
    table, _ = sensitivity_table(model, windows[:1], stats, "cpu", SensitivityOptions("ppl", (0.5,)), str(path),
                                 progress=False)
    data = json.loads(path.read_text())
    data["values"]["model.layers.1.mlp.up_proj"]["0.5"] = float("nan")
    path.write_text(json.dumps(data))
    with pytest.raises(SensitivityError, match=r"model\.layers\.1\.mlp\.up_proj at kept fraction 0\.5"):
        sensitivity_table(model, windows[:1], stats, "cpu", SensitivityOptions("ppl", (0.5,)), str(path),
                          progress=False)
