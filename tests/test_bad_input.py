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
    weights = os.path.join(damaged, "model.safetensors")
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
    path = os.path.join(bad, "model.safetensors")
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
        model_io.save_compressed(model, tokenizer, target, compression)
    load_compressed(target)  # still the old, complete model
    assert sorted(os.listdir(tmp_path)) == ["previous"]


def test_uncompressed_directory_is_not_a_compressed_model(tiny_dir):
    with pytest.raises(CompressedModelError, match="compression"):
        load_compressed(tiny_dir)


def test_statistics_of_another_model_are_refused(compressed_dir, tmp_path, capsys):
    other = save_tiny_model("qwen2", str(tmp_path))
    rc = compress.main(["--step", "3", "--model", other, "--stats_path", os.path.join(compressed_dir, "stats"),
                        "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2
    assert "rerun step 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
