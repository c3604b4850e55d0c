"""Bad input fails fast with exit code 2 and one line naming the fix; damaged files are refused."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress
from tests.tiny_models import save_tiny_model
from utils import io as model_io
from utils.io import CompressedModelError, load_compressed


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model("llama", str(tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="module")
def compressed_dir(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("c") / "out")
    assert compress.main(["--step", "1-3", "--model", tiny_dir, "--dataset", "random", "--whitening_nsamples", "4",
                          "--model_seq_len", "16", "--save_path", out, "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("argv,needle", [
    (["--step", "3", "--ratio", "1.2"], "--ratio"),
    (["--step", "3", "--ratio", "0"], "--ratio"),
    (["--step", "11"], "unknown step"),
    (["--step", "one"], "--step"),
    (["--step", "4-1"], "the range 4-1 is reversed; steps run in number order: write 1-4"),
    (["--step", "3", "--ratio", "0.2", "--model_ratio", "0.3"], "give one of them"),
    (["--step", "3", "--model_ratio", "1.5"], "--model_ratio 1.5"),
    (["--step", "4", "--model_ratio", "0.3"], "add --step 2 or 3"),
    (["--step", "7"], "--data_path"),
    (["--step", "1", "--model", "/nonexistent/model"], "no such"),
    (["--step", "1", "--model", "missing.gguf"], "GGUF"),
    (["--step", "1", "--dataset", "nonexistent.txt"], "neither"),
    (["--step", "1", "--dataset", "wiki[0.9:0.1]"], "slice"),
    (["--step", "3"], "statistics"),
    (["--step", "1"], "--save_path"),
    (["--step", "4", "--model_path", "/nonexistent/compressed"], "no such"),
    (["--step", "1", "--device", "tpu"], "--device"),
    (["--step", "1", "--whitening_nsamples", "0"], "at least 1"),
    (["--step", "3", "--svd_driver", "gesvda"], "CUDA-only"),
    (["--step", "3", "--decomposition", "rsvd", "--rsvd_oversamples", "-1"], "0 or more"),
    (["--step", "3", "--decomposition", "rsvd", "--rsvd_n_iter", "-2"], "0 or more"),
])
def test_validation_errors_exit_2_before_loading(argv, needle, tiny_dir, tmp_path, capsys):
    full = list(argv)
    if "--model" not in full:
        full += ["--model", tiny_dir]
    if "--save_path" not in full and needle != "--save_path":
        full += ["--save_path", str(tmp_path / "never")]
    assert compress.main(full + ["--device", "cpu"] if "--device" not in full else full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not os.path.exists(tmp_path / "never" / "config.json")


def test_cuda_refused_without_cuda(tiny_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert compress.main(["--step", "1", "--model", tiny_dir, "--save_path", str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA" in capsys.readouterr().err


def test_hub_dataset_offline_fails_at_once_naming_alternatives(monkeypatch):
    from utils import data
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(data.DatasetError, match="--dataset FILE.*pydoc"):
        data.load_text("wikitext2", "train")


def copy_of(directory: str, tmp_path, name: str) -> str:
    import shutil
    target = str(tmp_path / name)
    shutil.copytree(directory, target)
    return target


def test_truncated_safetensors_is_refused(compressed_dir, tmp_path):
    damaged = copy_of(compressed_dir, tmp_path, "damaged")
    # step 3 writes shards (model-0000k-of-0000n.safetensors): the last one holds the embeddings
    weights = os.path.join(damaged, sorted(n for n in os.listdir(damaged) if n.startswith("model-"))[-1])
    size = os.path.getsize(weights)
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(CompressedModelError, match="damaged or truncated"):
        load_compressed(damaged)


def test_ranks_that_do_not_match_the_tensors_are_refused(compressed_dir, tmp_path):
    bad = copy_of(compressed_dir, tmp_path, "bad")
    config_path = os.path.join(bad, "config.json")
    config = json.load(open(config_path))
    name = next(iter(config["compression"]["ranks"]))
    config["compression"]["ranks"][name] += 1
    json.dump(config, open(config_path, "w"))
    with pytest.raises(CompressedModelError, match="ranks do not match"):
        load_compressed(bad)


def test_missing_tensor_is_refused(compressed_dir, tmp_path):
    bad = copy_of(compressed_dir, tmp_path, "missing")
    path = os.path.join(bad, sorted(n for n in os.listdir(bad) if n.startswith("model-"))[0])  # layer 0's shard
    tensors = load_file(path)
    tensors.pop(next(k for k in tensors if k.endswith(".v.weight")))
    save_file(tensors, path)
    with pytest.raises(CompressedModelError, match="missing"):
        load_compressed(bad)


def test_interrupted_save_leaves_no_complete_looking_output(compressed_dir, tmp_path, monkeypatch):
    model, tokenizer, compression = load_compressed(compressed_dir)
    target = str(tmp_path / "interrupted")

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        model_io.save_compressed(model, tokenizer, target, compression)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary sibling remains


def test_interrupted_save_keeps_the_previous_output(compressed_dir, tmp_path, monkeypatch):
    target = copy_of(compressed_dir, tmp_path, "previous")
    model, tokenizer, compression = load_compressed(target)
    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk")))
    with pytest.raises(RuntimeError):
        model_io.save_compressed(model, tokenizer, target, compression, overwrite=True)
    load_compressed(target)  # still the old, complete model
    assert sorted(os.listdir(tmp_path)) == ["previous"]


def test_uncompressed_directory_is_not_a_compressed_model(tiny_dir):
    with pytest.raises(CompressedModelError, match="compression"):
        load_compressed(tiny_dir)


def test_statistics_of_another_model_are_refused(compressed_dir, tmp_path, capsys):
    other = save_tiny_model("qwen2", str(tmp_path))
    rc = compress.main(["--step", "3", "--model", other, "--stats_path", compressed_dir + ".stats",
                        "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    assert "rerun step 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_api_save_follows_the_cli_rule_on_earlier_outputs(compressed_dir, tmp_path):
    """save_compressed refuses an earlier output without overwrite=True (the CLI's --overwrite) and
    anything it did not write even with it; nothing is touched by a refusal."""
    from utils.outputs import OutputError
    target = copy_of(compressed_dir, tmp_path, "previous")
    weights = os.path.join(target, "model.safetensors.index.json")  # step 3 writes shards and their index
    before = os.stat(weights).st_mtime_ns
    model, tokenizer, compression = load_compressed(target)
    with pytest.raises(OutputError, match="already holds a compressed model.*--overwrite"):
        model_io.save_compressed(model, tokenizer, target, {**compression, "ratio": 0.5})
    assert os.stat(weights).st_mtime_ns == before and load_compressed(target)[2]["ratio"] != 0.5
    model_io.save_compressed(model, tokenizer, target, {**compression, "ratio": 0.5}, overwrite=True)
    assert load_compressed(target)[2]["ratio"] == 0.5
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(OutputError, match="todo.txt"):
        model_io.save_compressed(model, tokenizer, str(foreign), compression, overwrite=True)
    assert os.listdir(foreign) == ["todo.txt"]
    with pytest.raises(OutputError, match="input model"):
        model_io.save_compressed(model, tokenizer, os.path.join(target, "inner"), compression, protected=(target,))


# ------------------------------------------------------------------ errors before the wait (no weights loaded)

@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if anything loads weights: the checks below must come first."""
    import pipeline.session
    import utils.model

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(utils.model, "load_model", refuse)
    monkeypatch.setattr(compress, "ensure_model", refuse)
    monkeypatch.setattr(pipeline.session, "ensure_model", refuse)  # evaluater's steps load through it


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.mark.parametrize("model,reachable,exists,needle", [
    ("smollm2-135", False, None, "did you mean --model smollm2-135m?"),
    ("SmolLM2-135M", False, None, "did you mean --model smollm2-135m?"),
    ("someorg/no-such-model", False, None, "the hub cannot be reached"),
    ("out/no-such-dir", False, None, "no such local directory or file"),
    ("./missing/model", False, None, "no such directory or file"),
    ("someorg/no-such-model", True, False, "the hub has no model 'someorg/no-such-model'"),
])
def test_model_name_refused_at_once(model, reachable, exists, needle, no_loading, monkeypatch, tmp_path, capsys):
    from utils import data
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: reachable)
    monkeypatch.setattr(compress, "_hub_repo_exists", lambda spec: exists)
    assert compress.main(["--step", "1", "--model", model, "--dataset", "random", "--save_path",
                          str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert needle in _one_error_line(capsys)


def test_hub_offline_mode_refuses_an_uncached_model(no_loading, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert compress.main(["--step", "1", "--model", "someorg/no-such-model", "--dataset", "random",
                          "--save_path", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "HF_HUB_OFFLINE=1" in _one_error_line(capsys)


def test_plan_with_a_rank_too_large_is_refused_before_loading(tiny_dir, no_loading, tmp_path, capsys):
    from utils.architecture import architecture
    from utils.plan import Plan
    shapes = architecture(tiny_dir).shapes
    plan = Plan.uniform(shapes, 0.2)
    name = next(iter(shapes))
    plan.modules[name].rank = min(shapes[name][:2]) + 5
    plan.save(str(tmp_path / "plan.json"))
    assert compress.main(["--step", "3", "--model", tiny_dir, "--plan", str(tmp_path / "plan.json"), "--whitening",
                          "none", "--save_path", str(tmp_path / "out"), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert name in line and f"above min(m, n) = {min(shapes[name][:2])}" in line
    assert not os.path.exists(tmp_path / "out")


def test_unreachable_model_ratio_is_refused_before_loading(tiny_dir, no_loading, tmp_path, capsys):
    assert compress.main(["--step", "3", "--model", tiny_dir, "--model_ratio", "0.95", "--whitening", "none",
                          "--save_path", str(tmp_path / "out"), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "unreachable" in line and "stay dense" in line
