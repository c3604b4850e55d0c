"""Steps 4-5: perplexity against a hand computation, non-finite accounting, JSON output, timing fields."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import compress
import evaluater
from scripts.sweep import make_tiny_model
from tests.reference import hand_ppl, hand_text_ppl
from tests.tiny_models import FAMILIES, tiny_model
from utils.data import load_text
from utils.io import load_compressed
from utils.model import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKI = os.path.join(REPO, "..", "shared", "data", "wikitext2", "wiki.valid.tokens")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (5 * 32 + 7,), generator=torch.Generator().manual_seed(1))


def test_perplexity_equals_hand_computed(llama, ids):
    expected, count = hand_ppl(llama, ids[:160].view(5, 32))
    for batch_size in (1, 2, 5):
        result = evaluater.perplexity(llama, ids, seq_len=32, batch_size=batch_size)
        assert result["ppl"] == pytest.approx(expected, rel=1e-6)
        assert result["tokens"] == count == 5 * 31
        assert (result["windows"], result["windows_available"], result["non_finite_tokens"]) == (5, 5, 0)
        assert result["mean_nll"] == pytest.approx(math.log(expected), rel=1e-6)


def test_eval_limit_changes_window_count_and_nothing_else(llama, ids):
    full = evaluater.perplexity(llama, ids, seq_len=32, batch_size=2)
    limited = evaluater.perplexity(llama, ids, seq_len=32, batch_size=2, limit=2)
    expected, count = hand_ppl(llama, ids[:64].view(2, 32))
    assert limited["ppl"] == pytest.approx(expected, rel=1e-6)
    assert (limited["windows"], limited["tokens"], limited["limit"]) == (2, count, 2)
    changed = {k for k in full if full[k] != limited[k]}
    assert changed == {"ppl", "mean_nll", "windows", "tokens", "limit"}
    assert evaluater.perplexity(llama, ids, seq_len=32, limit=99)["windows"] == 5


class NanOnMarker(torch.nn.Module):
    """Wraps a model; windows whose first token is `marker` get NaN logits."""

    def __init__(self, model, marker: int):
        super().__init__()
        self.model, self.marker = model, marker

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        out.logits[input_ids[:, 0] == self.marker] = float("nan")
        return out


def test_non_finite_window_is_counted_not_dropped(llama, ids):
    ids = ids.clone()
    ids[64] = 255  # first token of window 2
    ids[[0, 32, 96, 128]] = 1
    result = evaluater.perplexity(NanOnMarker(llama, 255), ids, seq_len=32, batch_size=2)
    assert result["ppl"] is None and result["mean_nll"] is None
    assert (result["windows"], result["tokens"]) == (5, 5 * 31)
    assert (result["non_finite_windows"], result["non_finite_tokens"]) == (1, 31)
    finite = torch.stack([ids[s:s + 32] for s in (0, 32, 96, 128)])
    assert result["ppl_finite_windows_only"] == pytest.approx(hand_ppl(llama, finite)[0], rel=1e-6)


def test_windows_drop_only_the_short_tail():
    windows, available = evaluater.eval_windows(torch.arange(100), 30)
    assert available == 3 and torch.equal(windows[2], torch.arange(60, 90))
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluater.eval_windows(torch.arange(20), 30)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


EVAL = ["--eval_datasets", "pydoc", "--model_seq_len", "64", "--device", "cpu"]


def test_step4_original_and_compressed_json(tiny_dir, tmp_path, capsys):
    original = tmp_path / "original.json"
    assert compress.main(["--step", "4", "--model", tiny_dir, "--eval_limit", "3", "--results", str(original)] + EVAL) == 0
    assert "perplexity pydoc: " in capsys.readouterr().out
    record = json.loads(original.read_text())
    result = record["perplexity"]["pydoc"]
    assert record["compression"] is None and record["model"]["compressed"] is False
    assert (result["windows"], result["tokens"], result["seq_len"], result["limit"]) == (3, 189, 64, 3)
    assert result["dtype"] == "float32" and result["non_finite_tokens"] == 0
    model, tokenizer = load_model(tiny_dir)
    text = load_text("pydoc", "test")
    assert result["ppl"] == pytest.approx(hand_text_ppl(model, tokenizer, text, 64, limit=3), rel=1e-5)
    saved = tmp_path / "c"
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                          "--save_path", str(saved)]) == 0
    assert compress.main(["--step", "4", "--model_path", str(saved), "--eval_limit", "3"] + EVAL) == 0
    record = json.loads((saved / "results.json").read_text())  # default: next to the model
    assert record["compression"]["ratio"] == 0.4 and record["compression"]["ranks"]["matrices"] == 14
    assert record["model_description"]["parameters"] == record["compression"]["parameters"]["compressed"]
    assert record["perplexity"]["pydoc"]["windows"] == 3
    compressed = load_compressed(str(saved))[0]
    assert record["perplexity"]["pydoc"]["ppl"] == pytest.approx(hand_text_ppl(compressed, tokenizer, text, 64, 3),
                                                                 rel=1e-5)
    # step 5 on the same model adds its section to the same file
    assert compress.main(["--step", "5", "--model_path", str(saved), "--prefill_len", "16", "--gen_seq_len", "3",
                          "--repeats", "2"] + EVAL) == 0
    record = json.loads((saved / "results.json").read_text())
    assert record["perplexity"]["pydoc"]["windows"] == 3
    ratios = record["efficiency"]["ratios"]
    assert ratios["parameters"] == pytest.approx(record["compression"]["parameters"]["compressed"] /
                                                 record["compression"]["parameters"]["original"])
    assert all(value > 0 for value in ratios.values())


def test_step5_compares_with_the_same_truncated_original(tiny_dir, tmp_path):
    """A model compressed with --num_layers is timed against the original cut to the same layers."""
    saved = tmp_path / "c1"
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                          "--num_layers", "1", "--save_path", str(saved)]) == 0
    assert compress.main(["--step", "5", "--model_path", str(saved), "--prefill_len", "16", "--gen_seq_len", "2",
                          "--repeats", "1"] + EVAL) == 0
    record = json.loads((saved / "results.json").read_text())
    assert record["compression"]["num_layers"] == 1
    assert record["efficiency"]["original"]["parameters"] == record["compression"]["parameters"]["original"]


def test_step4_refuses_random_weights(tiny_dir, tmp_path, capsys):
    saved = tmp_path / "c"
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--save_path", str(saved)]) == 0
    config = json.loads((saved / "config.json").read_text())
    config["compression"]["random_weights"] = True
    (saved / "config.json").write_text(json.dumps(config))
    assert compress.main(["--step", "4", "--model_path", str(saved)] + EVAL) == 2
    assert "random weights" in capsys.readouterr().err
    assert not (saved / "results.json").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_efficiency_fields_positive(family):
    model = tiny_model(family)
    other = tiny_model(family, seed=1)
    prompts = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    figures = evaluater.measure_efficiency({"model": model, "original": other}, prompts, gen_len=4,
                                           repeats=3, device="cpu")
    for name in ("model", "original"):
        f = figures[name]
        assert f["prefill_tokens_per_s"] > 0 and f["decode_tokens_per_s"] > 0 and f["prefill_s"] > 0
        assert 0 < f["decode_latency_ms"]["median"] <= f["decode_latency_ms"]["p90"]
        assert f["peak_memory"]["bytes"] > 0 and f["peak_memory"]["kind"] == "cpu_peak_rss_delta"
        assert f["parameters"] > 0 and f["weight_bytes"] == 4 * f["parameters"]
        assert len(f["runs"]["prefill_tokens_per_s"]) == 3
        assert f["linear_flops_per_token"] > 0
    ratios = evaluater.efficiency_ratios(figures["model"], figures["original"])
    assert ratios["parameters"] == 1.0 and ratios["linear_flops"] == 1.0 and all(v > 0 for v in ratios.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU peak memory")
def test_cuda_peak_memory_leaves_out_what_else_is_on_the_device():
    model = tiny_model("llama").cuda()
    ballast = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")  # stands for the other model
    prompts = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    memory = evaluater.peak_memory(model, prompts, 4, "cuda")
    assert memory["kind"] == "cuda_weights_plus_run_peak" and memory["run_peak_bytes"] > 0
    assert evaluater.weight_bytes(model) < memory["bytes"] < 64 * 2 ** 20 < ballast.numel()


def test_linear_flops_follow_the_ranks(llama):
    from component import LowRankLinear
    from utils.model import decoder_layers
    linears = [m for m in decoder_layers(llama).modules() if type(m) is torch.nn.Linear]
    assert evaluater.linear_flops_per_token(llama) == 2 * sum(m.weight.numel() for m in linears)
    compressed = tiny_model("llama")
    compressed.model.layers[0].mlp.down_proj = LowRankLinear(160, 64, 8, bias=False)
    saved = 64 * 160 - 8 * (64 + 160)
    assert evaluater.linear_flops_per_token(compressed) == evaluater.linear_flops_per_token(llama) - 2 * saved


def test_greedy_decode_matches_generate(llama):
    """The timed loop decodes exactly what transformers' greedy generate does."""
    prompts = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    seen = []
    original_forward = llama.forward

    def recording_forward(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        seen.append(int(out.logits[0, -1].argmax()))
        return out
    llama.forward = recording_forward
    try:
        evaluater.generate_timed(llama, prompts, gen_len=5, device="cpu")
    finally:
        del llama.forward
    reference = llama.generate(prompts, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompts))
    assert seen[:5] == reference[0, 10:].tolist()


# ---------------------------------------------------------------------------------------- SmolLM2

needs_smollm2 = pytest.mark.integration("smollm2", "wikitext2/wiki.valid.tokens")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_perplexity_finite_and_reproducible(smollm2):
    from utils.data import tokenize
    model, tokenizer = smollm2
    ids = tokenize(tokenizer, load_text(WIKI + "[0:0.02]", "test"))
    first = evaluater.perplexity(model, ids, seq_len=128, batch_size=2, limit=6)
    second = evaluater.perplexity(model, ids, seq_len=128, batch_size=2, limit=6)
    assert first["windows"] == 6 and first["tokens"] == 6 * 127 and first["non_finite_tokens"] == 0
    assert first["ppl"] == pytest.approx(hand_ppl(model, ids[:6 * 128].view(6, 128))[0], rel=1e-4)
    assert second["ppl"] == pytest.approx(first["ppl"], rel=1e-4)
