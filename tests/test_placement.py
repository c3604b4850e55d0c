"""--device_map / --max_memory: a model dispatched by accelerate (forced CPU + disk offload here)
gives the logits of the model held whole, and steps 4-5 run and record the placement."""
from __future__ import annotations

import gc
import json
import os

import pytest
import torch

import compress
from scripts.sweep import make_tiny_model
from tests.tiny_models import tiny_model
from utils.model import parse_max_memory, place_model

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny Llama holds 411 kB of float32 weights (embedding 66 kB, each layer 173 kB): 300 kB of CPU
# keeps the embedding / tied lm_head and sends the decoder layers to disk
BUDGET = "cpu=300KB"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_offloaded_model_gives_the_logits_of_the_whole_one(strategy, tmp_path):
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    whole = tiny_model("llama")
    with torch.no_grad():
        expected = whole(ids).logits
    model = tiny_model("llama")
    placement = place_model(model, "cpu", strategy, parse_max_memory(BUDGET), str(tmp_path / "off"))
    summary = placement.describe()
    assert summary["device_map"] == strategy and summary["modules_per_device"].get("disk", 0) > 0
    assert sum(summary["bytes_per_device"].values()) >= 410_000 and summary["bytes_per_device"]["cpu"] <= 300_000
    assert os.listdir(placement.offload_dir)  # the decoder layers' weights went to disk
    assert any(p.device.type == "meta" for p in model.parameters())  # ... and left memory
    with torch.no_grad():
        logits = model(ids.to(placement.input_device)).logits
    assert torch.equal(logits, expected)


def test_a_budget_nothing_fits_in_is_refused(tmp_path):
    from utils.model import ModelSpecError
    with pytest.raises(ModelSpecError, match="raise the budget"):
        place_model(tiny_model("llama"), "cpu", "sequential", parse_max_memory("cpu=1KB"), str(tmp_path))


@pytest.mark.parametrize("text,needle", [
    ("0=1GiB", "CUDA device"), ("cpu", "DEVICE=SIZE"), ("tpu=1GiB", "not a GPU index"), ("cpu=lots", "not a size"),
])
def test_bad_max_memory_is_one_line_naming_the_fix(text, needle, tiny_dir, capsys):
    if needle == "CUDA device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert compress.main(["--step", "4", "--model", tiny_dir, "--device", "cpu", "--device_map", "auto",
                          "--max_memory", text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "--max_memory" in err[0], err


@pytest.mark.parametrize("argv,needle", [
    (["--step", "4", "--max_memory", "cpu=1GiB"], "need --device_map"),
    (["--step", "2", "--device_map", "auto", "--plan", "PLAN"], "steps 4, 5, 6"),
])
def test_placement_flags_need_each_other_and_an_evaluation_step(argv, needle, tiny_dir, tmp_path, capsys):
    argv = [str(tmp_path / "plan.json") if a == "PLAN" else a for a in argv]
    assert compress.main(argv + ["--model", tiny_dir, "--device", "cpu"]) == 2
    assert needle in capsys.readouterr().err


EVAL = ["--eval_datasets", "pydoc", "--model_seq_len", "32", "--eval_limit", "3", "--device", "cpu"]


def test_steps_4_and_5_on_an_offloaded_compressed_model(tiny_dir, tmp_path):
    saved = tmp_path / "c"
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.4",
                          "--save_path", str(saved)]) == 0
    whole, placed = tmp_path / "whole.json", tmp_path / "placed.json"
    assert compress.main(["--step", "4", "--model_path", str(saved), "--results", str(whole)] + EVAL) == 0
    assert compress.main(["--step", "4,5", "--model_path", str(saved), "--results", str(placed),
                          "--device_map", "sequential", "--max_memory", "cpu=250KB",
                          "--offload_folder", str(tmp_path / "off"), "--prefill_len", "16", "--gen_seq_len", "2",
                          "--repeats", "1"] + EVAL) == 0
    a, b = json.loads(whole.read_text()), json.loads(placed.read_text())
    assert b["perplexity"]["pydoc"]["ppl"] == a["perplexity"]["pydoc"]["ppl"]
    assert b["perplexity"]["pydoc"]["placement"]["modules_per_device"]["disk"] > 0
    placement = b["efficiency"]["settings"]["placement"]
    assert placement["model"]["device_map"] == "sequential" and placement["original"]["device_map"] == "sequential"
    assert placement["model"]["modules_per_device"].get("disk", 0) > 0
    assert b["efficiency"]["ratios"]["parameters"] == pytest.approx(
        b["compression"]["parameters"]["compressed"] / b["compression"]["parameters"]["original"])
    gc.collect()
    assert os.listdir(tmp_path / "off") == []  # offloaded weights are removed when the models are freed
