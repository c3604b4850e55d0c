"""Step 9: greedy output is reproducible, identical when the model is dispatched with disk offload,
matches a hand-written greedy loop; sampling is seeded; the chat template is used; bad input exits 2."""
from __future__ import annotations

import json

import pytest
import torch

import compress
import generate
from scripts.sweep import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The cat sat on", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


def run(tiny_dir: str, path, *extra: str) -> dict:
    argv = ["--step", "9", "--model", tiny_dir, "--max_new_tokens", "12", "--results", str(path), "--device", "cpu"]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert compress.main(argv + list(extra)) == 0
    return json.loads(path.read_text())["generation"]


def ids_of(data: dict, who: str = "model") -> list[list[int]]:
    return [record[who]["completion_ids"] for record in data["completions"]]


def test_greedy_is_reproducible_and_equal_to_a_plain_argmax_loop(tiny_dir, tmp_path, capsys):
    first, second = run(tiny_dir, tmp_path / "a.json"), run(tiny_dir, tmp_path / "b.json")
    out = capsys.readouterr().out
    assert "prompt 1: The cat sat on" in out and "prompt 2: Numbers: 1 2 3" in out
    assert ids_of(first) == ids_of(second)
    assert all(len(ids) == 12 for ids in ids_of(first))  # the tiny model has no EOS: max_new_tokens
    assert first["settings"]["decoding"] == "greedy" and first["settings"]["chat_template"] is True
    assert [r["model"]["chat_template"] for r in first["completions"]] == [False, False]  # it has none
    # the same tokens from a loop of full forward passes without the KV cache
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for prompt, expected in zip(PROMPTS, ids_of(first)):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert ids[0, -12:].tolist() == expected


def test_dispatched_with_disk_offload_generates_the_same_tokens(tiny_dir, tmp_path):
    whole = run(tiny_dir, tmp_path / "whole.json")
    placed = run(tiny_dir, tmp_path / "placed.json", "--device_map", "sequential", "--max_memory", "cpu=300KB",
                 "--offload_folder", str(tmp_path / "off"))
    assert ids_of(placed) == ids_of(whole)
    assert placed["settings"]["placement"]["model"]["modules_per_device"]["disk"] > 0


def test_sampling_is_seeded_per_prompt(tiny_dir, tmp_path):
    a = run(tiny_dir, tmp_path / "a.json", "--temperature", "1.5", "--seed", "3")
    b = run(tiny_dir, tmp_path / "b.json", "--temperature", "1.5", "--seed", "3")
    c = run(tiny_dir, tmp_path / "c.json", "--temperature", "1.5", "--seed", "4")
    greedy = run(tiny_dir, tmp_path / "g.json")
    assert ids_of(a) == ids_of(b) and ids_of(a) != ids_of(c) and ids_of(a) != ids_of(greedy)
    assert a["settings"]["decoding"] == "sampling" and a["settings"]["seed"] == 3


def test_compare_puts_the_originals_completion_beside(tiny_dir, tmp_path):
    saved = tmp_path / "c"
    assert compress.main(["--step", "3", "--model", tiny_dir, "--whitening", "none", "--ratio", "0.6",
                          "--save_path", str(saved)]) == 0
    data = run(tiny_dir, tmp_path / "r.json", "--model_path", str(saved), "--compare")
    original = run(tiny_dir, tmp_path / "o.json")
    assert ids_of(data, "original") == ids_of(original)
    assert json.loads((tmp_path / "r.json").read_text())["compression"]["ratio"] == 0.6


def test_chat_template_wraps_the_prompt_unless_turned_off(tiny_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    ids, templated = generate.prompt_ids(tokenizer, "hi", chat_template=True)
    assert templated and tokenizer.decode(ids[0]) == "<user>hi<assistant>"
    ids, templated = generate.prompt_ids(tokenizer, "hi", chat_template=False)
    assert not templated and tokenizer.decode(ids[0]) == "hi"


def test_prompts_file_lines_and_jsonl(tmp_path):
    text, rows = tmp_path / "p.txt", tmp_path / "p.jsonl"
    text.write_text("first\n\nsecond\n")
    rows.write_text('{"prompt": "a"}\n{"prompt": "b c"}\n')
    assert generate.read_prompts(["x"], str(text)) == ["x", "first", "second"]
    assert generate.read_prompts(None, str(rows)) == ["a", "b c"]


@pytest.mark.parametrize("extra,needle", [
    ([], "--prompt TEXT"),
    (["--prompts", "/nonexistent.txt"], "--prompts /nonexistent.txt"),
    (["--prompt", "x", "--top_p", "0.9"], "--temperature"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["--prompt", "x", "--compare"], "--model_path"),
])
def test_bad_generation_input_exits_2(extra, needle, tiny_dir, capsys):
    assert compress.main(["--step", "9", "--model", tiny_dir, "--device", "cpu"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
