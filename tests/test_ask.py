"""--ask: at the end of a run that makes a compressed model, one question answered greedily by the
original and by the compressed model, printed and kept in the results JSON; bad use exits 2."""
from __future__ import annotations

import json

import pytest

import compress
from scripts.sweep import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "Numbers: 1 2 3"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny random model with larger decoder weights: at its initial scale it only repeats the
    prompt's last byte, compressed or not, which would not show which model answered."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    made = make_tiny_model(str(tmp_path_factory.mktemp("tiny")))
    model = AutoModelForCausalLM.from_pretrained(made)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".layers." in name and weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    path = str(tmp_path_factory.mktemp("scaled"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(made).save_pretrained(path)
    return path


def generation(tiny_dir: str, results, *extra: str) -> dict:
    """Step 9's greedy completion of QUESTION (12 tokens)."""
    assert compress.main(["--step", "9", "--prompt", QUESTION, "--max_new_tokens", "12", "--results", str(results),
                          "--device", "cpu", *extra]) == 0
    return json.loads(results.read_text())["generation"]["completions"][0]["model"]


def test_ask_answers_with_the_original_and_the_compressed_model(tiny_dir, tmp_path, capsys):
    saved, results = tmp_path / "c", tmp_path / "r.json"
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.6",
                          "--save_path", str(saved), "--results", str(results), "--device", "cpu",
                          "--ask", QUESTION, "--max_new_tokens", "12"]) == 0
    out = capsys.readouterr().out.splitlines()
    asked = out.index(f"asked: {QUESTION}")
    assert out[asked + 1].startswith("  original:") and out[asked + 2].startswith("  compressed:")
    ask = json.loads(results.read_text())["ask"]
    assert ask["question"] == QUESTION and ask["settings"]["decoding"] == "greedy"
    # the same tokens as step 9 gives the original and the saved compressed model
    original = generation(tiny_dir, tmp_path / "o.json", "--model", tiny_dir)
    compressed = generation(tiny_dir, tmp_path / "m.json", "--model_path", str(saved))
    assert ask["original"]["completion_ids"] == original["completion_ids"]
    assert ask["compressed"]["completion_ids"] == compressed["completion_ids"]
    assert ask["compressed"]["completion_ids"] != ask["original"]["completion_ids"]  # 60% removed shows
    assert len(ask["original"]["completion_ids"]) == 12 and not ask["original"]["empty"]
    assert " ".join(ask["original"]["completion"].split()) in out[asked + 1]


def test_ask_on_a_saved_model(tiny_dir, tmp_path, capsys):
    saved = tmp_path / "c"
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                          "--save_path", str(saved), "--device", "cpu"]) == 0
    results = tmp_path / "r.json"
    assert compress.main(["--step", "4", "--model_path", str(saved), "--eval_datasets", "pydoc[0.9:1]",
                          "--eval_limit", "1", "--model_seq_len", "16", "--results", str(results),
                          "--device", "cpu", "--ask", QUESTION, "--max_new_tokens", "4"]) == 0
    data = json.loads(results.read_text())
    assert "perplexity" in json.dumps(data) and len(data["ask"]["compressed"]["completion_ids"]) == 4


@pytest.mark.parametrize("extra,needle", [
    (["--step", "1", "--save_path", "/tmp/never-written-ask", "--ask", "hi"], "--ask"),
    (["--step", "3", "--save_path", "/tmp/never-written-ask", "--whitening", "none", "--ask", " "], "--ask"),
    (["--step", "3", "--save_path", "/tmp/never-written-ask", "--whitening", "none", "--ask", "hi",
      "--max_new_tokens", "0"], "--max_new_tokens"),
])
def test_bad_ask_exits_2_before_work(extra, needle, tiny_dir, capsys):
    assert compress.main(["--model", tiny_dir, "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
