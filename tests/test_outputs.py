"""Output-path safety (utils/outputs.py, atomic_path): nothing the user did not ask to replace is lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from utils.io import atomic_path, save_compressed
from utils.outputs import OutputError, check_output_path, clean_stale_partials, judge_directory

COMPRESSION = {"base_model": "tiny", "method": "svd", "ratio": 0.5, "ranks": {}}
META = {"model": "tiny", "layer_prefix": "model.layers", "streams": {"0": {}}, "gram_layout": "upper"}


def write(path, text: str = "x") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


def model_dir(path, **extra) -> str:
    """A hand-made compressed model directory (what save_compressed writes)."""
    write(os.path.join(path, "config.json"), json.dumps({"model_type": "llama", "compression": COMPRESSION}))
    write(os.path.join(path, "model.safetensors"), "weights")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        write(os.path.join(path, name), "{}")
    for name, text in extra.items():
        write(os.path.join(path, name), text)
    return str(path)


def stats_dir(path) -> str:
    write(os.path.join(path, "meta.json"), json.dumps(META))
    write(os.path.join(path, "layer_0000.safetensors"), "s")
    write(os.path.join(path, "plan_0.8.json"), "{}")
    write(os.path.join(path, "ranks_0.5.json"), "{}")
    return str(path)


def snapshot(root) -> dict[str, bytes]:
    """Every file under `root` with its bytes, to prove a refusal touched nothing."""
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            full = os.path.join(directory, name)
            with open(full, "rb") as handle:
                found[os.path.relpath(full, root)] = handle.read()
    return found


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------------------------------- allowed

@pytest.mark.parametrize("kind", ["model", "stats"])
def test_fresh_path_and_empty_directory_are_fine(tmp_path, kind):
    check_output_path(str(tmp_path / "new"), kind, overwrite=False)
    check_output_path(str(tmp_path / "new.pt"), "model", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_path(str(tmp_path / "empty"), kind, overwrite=False)


def test_model_directory_holding_only_our_stats_is_fine(tmp_path):
    out = tmp_path / "out"
    stats_dir(out / "stats")
    check_output_path(str(out), "model", overwrite=False)
    assert judge_directory(str(out)) == "stats_only"
    # the statistics themselves are an earlier output: replacing them needs --overwrite
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_path(str(out / "stats"), "stats", overwrite=False)
    check_output_path(str(out / "stats"), "stats", overwrite=True)


def test_earlier_outputs_need_overwrite(tmp_path):
    model = model_dir(tmp_path / "m", **{"results.json": "{}", "generation_config.json": "{}",
                                         "modeling_low_rank.py": "# ours"})
    stats_dir(os.path.join(model, "stats"))
    stats = stats_dir(tmp_path / "s")
    for path, kind in ((model, "model"), (stats, "stats")):
        with pytest.raises(OutputError, match=r"pass --overwrite") as error:
            check_output_path(path, kind, overwrite=False)
        assert path in str(error.value) and "\n" not in str(error.value)
        check_output_path(path, kind, overwrite=True)


@pytest.mark.parametrize("tokenizer_of", [None, pytest.param("smollm2-135m", marks=pytest.mark.integration("smollm2"))])
def test_what_save_compressed_writes_is_ours(tokenizer_of, tmp_path):
    """The model files alone, and with the bundled SmolLM2's tokenizer files (chat_template.jinja among them)."""
    from tests.tiny_models import tiny_model
    from utils.model import resolve_model, load_tokenizer
    model = tiny_model("llama")
    tokenizer = load_tokenizer(resolve_model(tokenizer_of)) if tokenizer_of else None
    directory, single = str(tmp_path / "out"), str(tmp_path / "out.pt")
    save_compressed(model, tokenizer, directory, COMPRESSION)
    save_compressed(model, None, single, COMPRESSION)
    assert judge_directory(directory) == "model", sorted(os.listdir(directory))
    for path in (directory, single):
        with pytest.raises(OutputError, match="--overwrite"):
            check_output_path(path, "model", overwrite=False)
        check_output_path(path, "model", overwrite=True)
    # and a second save over the first (stats/ kept) goes through atomic_path's own check
    stats_dir(os.path.join(directory, "stats"))
    save_compressed(model, tokenizer, directory, COMPRESSION)
    assert os.path.isfile(os.path.join(directory, "stats", "meta.json"))
    assert not [n for n in os.listdir(tmp_path) if ".old-" in n or ".partial-" in n]


# ---------------------------------------------------------------------------------------- refused

@pytest.mark.parametrize("overwrite", [False, True])
def test_unrelated_file_survives(tmp_path, overwrite):
    for name in ("notes.txt", "user.pt", "model"):
        path = write(tmp_path / name, "precious")
        for kind in ("model", "stats"):
            with pytest.raises(OutputError, match="did not write") as error:
                check_output_path(path, kind, overwrite=overwrite)
            assert "\n" not in str(error.value)
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")  # a torch file, not our dict
    with pytest.raises(OutputError, match="did not write"):
        check_output_path(str(tmp_path / "other.pt"), "model", overwrite=overwrite)
    assert snapshot(tmp_path)["notes.txt"] == b"precious"


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_or_mixed_directories_refused(tmp_path, overwrite):
    cases = {
        "photos": lambda p: write(p / "a.jpg", "jpeg"),
        "hf_model": lambda p: (write(p / "config.json", '{"model_type": "llama"}'),  # no compression
                               write(p / "model.safetensors", "w")),
        "ours_plus": lambda p: (model_dir(p), write(p / "thesis.tex", "mine")),
        "ours_plus_dir": lambda p: (model_dir(p), write(p / "data" / "keep.bin", "mine")),
        "stats_plus": lambda p: (model_dir(p), stats_dir(p / "stats"), write(p / "stats" / "x.npy", "m")),
        "only_stats_foreign": lambda p: write(p / "stats" / "mine.txt", "m"),
        "no_marker": lambda p: write(p / "results.json", "{}"),
    }
    for name, build in cases.items():
        build(tmp_path / name)
    before = snapshot(tmp_path)
    for name in cases:
        for kind in ("model", "stats"):
            with pytest.raises(OutputError) as error:
                check_output_path(str(tmp_path / name), kind, overwrite=overwrite)
            assert "--overwrite never" in str(error.value) or "from this tool, not" in str(error.value)
    message = str(pytest.raises(OutputError, check_output_path, str(tmp_path / "ours_plus"), "model", True).value)
    assert "thesis.tex" in message and "config.json" not in message
    message = str(pytest.raises(OutputError, check_output_path, str(tmp_path / "stats_plus"), "model", True).value)
    assert "stats/x.npy" in message
    assert snapshot(tmp_path) == before


def test_kind_mismatch_refused(tmp_path):
    model, stats = model_dir(tmp_path / "m"), stats_dir(tmp_path / "s")
    with pytest.raises(OutputError, match="statistics directory from this tool"):
        check_output_path(stats, "model", overwrite=True)
    with pytest.raises(OutputError, match="compressed model from this tool"):
        check_output_path(model, "stats", overwrite=True)
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(OutputError, match="single file"):
        check_output_path(str(tmp_path / "d.pt"), "model", overwrite=True)


def test_symlink_output_refused(tmp_path):
    target = model_dir(tmp_path / "m")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(OutputError, match="symbolic link"):
        check_output_path(str(tmp_path / "link"), "model", overwrite=True)


def test_protected_model_directory(tmp_path):
    source = tmp_path / "base"
    write(source / "config.json", '{"model_type": "llama"}')
    os.symlink(source, tmp_path / "alias")
    refused = [str(source), str(source / "out"), str(source / "sub" / ".." / "out"),
               str(tmp_path / "elsewhere" / ".." / "base" / "x"), str(tmp_path / "alias" / "out"),
               str(tmp_path)]  # the output would contain the input model
    for path in refused:
        with pytest.raises(OutputError, match="input model"):
            check_output_path(path, "model", overwrite=True, protected=[str(source)])
    with pytest.raises(OutputError, match="input model"):  # protected given through the symlink
        check_output_path(str(source / "out"), "stats", overwrite=True, protected=[str(tmp_path / "alias")])
    check_output_path(str(tmp_path / "base-out"), "model", overwrite=False, protected=[str(source)])
    check_output_path(str(tmp_path / "x"), "model", False, protected=["HuggingFaceTB/SmolLM2-135M"])
    assert os.listdir(source) == ["config.json"]


# ---------------------------------------------------------------------------------------- stale partials

def test_stale_partials_removed_live_ones_kept(tmp_path, capsys):
    out = str(tmp_path / "out")
    dead = dead_pid()
    stale_dir = model_dir(f"{out}.partial-{dead}")
    stale_old = write(f"{out}.old-{dead}", "old")
    live = write(f"{out}.partial-{os.getpid()}", "mine")
    other = write(tmp_path / f"outer.partial-{dead}", "another path's")
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # another run still writing: its temporary is its work in progress
        live_other = model_dir(f"{out}.old-{running.pid}")
        removed = clean_stale_partials(out)
    finally:
        running.kill()
        running.wait()
    assert os.path.isdir(live_other)
    assert sorted(removed) == sorted([stale_dir, stale_old])
    assert not os.path.exists(stale_dir) and not os.path.exists(stale_old)
    assert os.path.exists(live) and os.path.exists(other)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1 and "stale" in lines[0]
    assert clean_stale_partials(out) == [live_other]  # that run has ended since


def test_stale_partial_with_foreign_files_kept_and_stats_rescued(tmp_path, capsys):
    out = str(tmp_path / "out")
    dead = dead_pid()
    foreign = write(f"{out}.old-{dead}/thesis.tex", "mine")
    unrelated = model_dir(f"{out}.partial-{dead}x")  # not a pid suffix: not a temporary of ours
    with_stats = model_dir(f"{out}.partial-{dead}")
    stats_dir(os.path.join(with_stats, "stats"))
    clean_stale_partials(out)
    assert os.path.exists(foreign) and os.path.isdir(unrelated)
    assert not os.path.exists(with_stats)
    assert judge_directory(out) == "stats_only"  # back where the next save keeps it
    assert "kept stale" in capsys.readouterr().out


def test_atomic_path_cleans_stale_partials(tmp_path):
    out = str(tmp_path / "plan.json")
    stale = write(f"{out}.partial-{dead_pid()}", "half")
    with atomic_path(out) as temporary:
        write(temporary, "{}")
    assert not os.path.exists(stale) and open(out).read() == "{}"


# ---------------------------------------------------------------------------------------- atomic_path

def test_atomic_path_never_deletes_foreign_files(tmp_path):
    out = model_dir(tmp_path / "out", **{"thesis.tex": "mine"})
    before = snapshot(tmp_path)
    ran = []
    with pytest.raises(OutputError, match="thesis.tex"):
        with atomic_path(out) as temporary:
            ran.append(temporary)
    assert ran == [] and snapshot(tmp_path) == before  # refused before any work


def test_atomic_path_rechecks_before_replacing(tmp_path):
    out = model_dir(tmp_path / "out")
    with pytest.raises(OutputError, match="thesis.tex.*new output is at"):
        with atomic_path(out) as temporary:
            model_dir(temporary)
            write(os.path.join(out, "thesis.tex"), "mine")  # appears during the run
    assert open(os.path.join(out, "thesis.tex")).read() == "mine"
    assert os.path.isfile(os.path.join(out, "config.json"))
    assert os.path.isdir(temporary)  # the new output is kept for the user


def test_atomic_path_replaces_our_directory(tmp_path):
    out = stats_dir(tmp_path / "stats")
    with atomic_path(out) as temporary:
        os.makedirs(temporary)
        write(os.path.join(temporary, "meta.json"), json.dumps(META))
    assert os.listdir(out) == ["meta.json"]
    assert os.listdir(tmp_path) == ["stats"]
