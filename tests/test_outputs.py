"""Output-path safety (utils/outputs.py, atomic_path): nothing the user did not ask to replace is lost."""
from __future__ import annotations

import json
import os
import re
import socket
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


HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
needs_proc = pytest.mark.skipif(not os.path.isfile("/proc/self/stat"), reason="process start times come from /proc")


def start_of(pid: int) -> int:
    """A running process's start time as a temporary's name records it (/proc/PID/stat field 22)."""
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[19])


def temporary_name(path, kind: str, pid: int, start: int = 1, host: str = HOST) -> str:
    """The name atomic_path gives a temporary of the run (pid, start, host): PATH.KIND-PID-START@HOST."""
    return f"{path}.{kind}-{pid}-{start}@{host}"


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
    save_compressed(model, tokenizer, directory, COMPRESSION, overwrite=True)
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

@needs_proc
def test_stale_partials_removed_live_ones_kept(tmp_path, capsys):
    out = model_dir(tmp_path / "out")  # in place: no replacement of it was cut short
    dead = dead_pid()
    stale_dir = model_dir(temporary_name(out, "partial", dead))
    stale_old = write(temporary_name(out, "old", dead), "old")
    live = write(temporary_name(out, "partial", os.getpid(), start_of(os.getpid())), "mine")
    other = write(temporary_name(tmp_path / "outer", "partial", dead), "another path's")
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # another run still writing: its temporary is its work in progress
        live_other = model_dir(temporary_name(out, "old", running.pid, start_of(running.pid)))
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
    foreign = write(os.path.join(temporary_name(out, "partial", dead_pid()), "thesis.tex"), "mine")
    unrelated = model_dir(f"{out}.partial-{dead}x")  # not a pid suffix: not a temporary of ours
    with_stats = model_dir(temporary_name(out, "partial", dead))
    stats_dir(os.path.join(with_stats, "stats"))
    clean_stale_partials(out)
    assert os.path.exists(foreign) and os.path.isdir(unrelated)
    assert not os.path.exists(with_stats)
    assert judge_directory(out) == "stats_only"  # back where the next save keeps it
    assert "kept stale" in capsys.readouterr().out


def test_atomic_path_cleans_stale_partials(tmp_path):
    out = str(tmp_path / "plan.json")
    stale = write(temporary_name(out, "partial", dead_pid()), "half")
    with atomic_path(out) as temporary:
        write(temporary, "{}")
    assert not os.path.exists(stale) and open(out).read() == "{}"


def test_other_hosts_and_unmarked_temporaries_kept_and_reported(tmp_path, capsys):
    out = str(tmp_path / "out")
    dead = dead_pid()  # not running here, which says nothing about a run on another node
    elsewhere = model_dir(temporary_name(out, "partial", dead, host="other-node"))
    elsewhere_old = write(temporary_name(out, "old", dead, host="other-node"), "old")
    unmarked = write(f"{out}.partial-{dead}", "an earlier version's")
    ours = write(temporary_name(out, "partial", dead), "half")
    assert clean_stale_partials(out) == [ours]
    assert os.path.isdir(elsewhere) and os.path.isfile(elsewhere_old) and os.path.isfile(unmarked)
    lines = capsys.readouterr().out.splitlines()
    for kept in (elsewhere, elsewhere_old):
        assert [line for line in lines if kept in line and "other-node" in line and "kept" in line]
    assert [line for line in lines if unmarked in line and "kept" in line and "host" in line]
    assert len(lines) == 4  # one per kept temporary, one for the removal


@needs_proc
def test_reused_pid_is_not_a_running_run(tmp_path):
    out = str(tmp_path / "out")
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the same pid, started at another time: a killed run whose pid was given to a new process
        reused = model_dir(temporary_name(out, "partial", running.pid, start_of(running.pid) + 1))
        live = model_dir(temporary_name(out, "old", running.pid, start_of(running.pid)))
        assert clean_stale_partials(out) == [reused]
        assert os.path.isdir(live)
    finally:
        running.kill()
        running.wait()


KILLED_BETWEEN_RENAMES = """
import os, sys
sys.path.insert(0, {root!r})
from tests.test_outputs import model_dir
from utils.io import atomic_path
renamed = []
def replace(source, target):  # os.replace, but the process dies just after the first rename
    if renamed:
        os._exit(9)
    renamed.append(source)
    real_replace(source, target)
real_replace, os.replace = os.replace, replace
with atomic_path({out!r}) as temporary:
    model_dir(temporary, **{{"results.json": "new"}})
"""


def kill_between_renames(out: str) -> None:
    """Replace the model directory `out` in a process killed between the swap's two renames."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES.format(root=root, out=out)],
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 9
    left = sorted(name.split("-")[0] for name in os.listdir(os.path.dirname(out)))
    assert left == ["out.old", "out.partial"]  # the old and the new output, only as temporaries


@pytest.mark.parametrize("trigger", ["clean", "write", "check"])
def test_kill_between_the_swaps_renames_is_recovered(tmp_path, trigger):
    out = model_dir(tmp_path / "out", **{"results.json": "old"})
    kill_between_renames(out)
    if trigger == "clean":
        clean_stale_partials(out)
    elif trigger == "write":  # the next run writing the same path: it finishes the swap, then replaces
        with atomic_path(out) as temporary:
            assert judge_directory(out) == "model" and open(os.path.join(out, "results.json")).read() == "new"
            model_dir(temporary, **{"results.json": "newer"})
    else:  # judged as the earlier output that it is, so replacing it again needs --overwrite
        with pytest.raises(OutputError, match="--overwrite"):
            check_output_path(out, "model", overwrite=False)
    assert judge_directory(out) == "model"
    assert open(os.path.join(out, "results.json")).read() == ("newer" if trigger == "write" else "new")


def test_old_output_restored_when_the_new_one_is_gone(tmp_path):
    out = str(tmp_path / "out")
    old = model_dir(temporary_name(out, "old", dead_pid()), **{"results.json": "old"})
    clean_stale_partials(out)
    assert not os.path.exists(old) and open(os.path.join(out, "results.json")).read() == "old"


def test_load_compressed_finishes_an_interrupted_swap(tmp_path):
    from tests.tiny_models import tiny_model
    from utils.io import load_compressed
    model, out, dead = tiny_model("llama"), str(tmp_path / "out"), dead_pid()
    save_compressed(model, None, str(tmp_path / "old"), {**COMPRESSION, "ratio": 0.1})
    save_compressed(model, None, str(tmp_path / "new"), {**COMPRESSION, "ratio": 0.2})
    os.replace(tmp_path / "old", temporary_name(out, "old", dead))  # where the kill left them
    os.replace(tmp_path / "new", temporary_name(out, "partial", dead))
    assert load_compressed(out)[2]["ratio"] == 0.2


def test_opening_statistics_finishes_an_interrupted_swap(tmp_path):
    from pipeline.steps import Statistics
    out, dead = str(tmp_path / "stats"), dead_pid()
    model_dir(temporary_name(out, "old", dead), **{"meta.json": '{"seq_len": 1}'})
    model_dir(temporary_name(out, "partial", dead), **{"meta.json": '{"seq_len": 2}'})
    assert Statistics.open(out).meta["seq_len"] == 2


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
