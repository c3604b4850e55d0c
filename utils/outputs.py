"""Output-path safety: never replace or delete anything the user did not ask us to replace.

Before any work starts, `check_output_path` judges what already sits at an output path:
  nothing, or an empty directory          -> fine
  a model directory holding only stats/   -> fine (step 1 of the same command wrote it)
  an earlier output of ours of that kind  -> only with --overwrite
  anything else, or a path inside --model -> refused, even with --overwrite; nothing touched
"Ours" is judged precisely: every entry must be a name this tool writes (below) and the marker
must be present (config.json with a "compression" block; meta.json with the statistics keys; a
.pt dict with our keys). `clean_stale_partials` removes the temporaries of killed runs of this
host, after `recover_interrupted_swap` has put back an output a kill left only as temporaries.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from typing import Iterable

KINDS = ("model", "stats")

# what save_compressed writes into a model directory; tokenizer files: transformers 5 writes
# tokenizer_config.json, tokenizer.json and chat_template.jinja (bundled SmolLM2 and a plain
# directory alike); older versions and slow tokenizers also wrote the rest
TOKENIZER_FILES = frozenset({
    "tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "chat_template.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
})
MODEL_FILES = frozenset({"config.json", "model.safetensors", "generation_config.json",
                         "results.json"}) | TOKENIZER_FILES  # results.json: steps 4-5
MODEL_FILE_PATTERNS = (re.compile(r"modeling_\w+\.py"),)
STATS_FILES = frozenset({"meta.json", "fisher.safetensors",
                         "self_calibration.safetensors", "self_calibration.json"})  # the last two: --dataset self
STATS_FILE_PATTERNS = (re.compile(r"layer_\d{4,}\.safetensors"), re.compile(r"(plan|ranks|sensitivity)_[\w.+-]+\.json"))
STATS_KEYS = ("model", "layer_prefix", "streams", "gram_layout")
PT_KEYS = ("format_version", "config", "compression", "state_dict")
# A temporary of an atomic write is PATH.partial-TOKEN (the new output being written) or PATH.old-TOKEN
# (the output it replaces, between the two renames of a directory swap), TOKEN = PID-START@HOST:
# the writing process, its start (clock ticks after boot, /proc/PID/stat; 0 without /proc) and host.
# The marker is in the name, so a file and a directory temporary are judged alike and a marker file
# cannot go missing. Earlier versions wrote TOKEN = PID, which names no host: such names are kept.
_TEMPORARY = r"\.(partial|old)-((\d+)(?:-(\d+)@([A-Za-z0-9_.-]+))?)"
# one of the files above written by such a write, left inside a temporary by a killed run
_TEMPORARY_SUFFIX = re.compile(_TEMPORARY + "$")
_SHOW = 3  # foreign names quoted in a message


class OutputError(ValueError):
    """An output path that this run must not write (message names the problem and the fix)."""


# ---------------------------------------------------------------------------------------- judging

def _known_file(name: str, files: frozenset, patterns: Iterable[re.Pattern]) -> bool:
    name = _TEMPORARY_SUFFIX.sub("", name)
    return name in files or any(p.fullmatch(name) for p in patterns)


def _entries(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as scan:
        return sorted(scan, key=lambda e: e.name)


def _plain_file(entry: os.DirEntry) -> bool:
    return entry.is_file(follow_symlinks=False)


def _plain_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir(follow_symlinks=False)


def _foreign_in_stats(path: str, prefix: str = "") -> list[str]:
    return [prefix + e.name for e in _entries(path)
            if not (_plain_file(e) and _known_file(e.name, STATS_FILES, STATS_FILE_PATTERNS))]


def _foreign_in_model(path: str) -> list[str]:
    foreign: list[str] = []
    for entry in _entries(path):
        if _plain_file(entry) and _known_file(entry.name, MODEL_FILES, MODEL_FILE_PATTERNS):
            continue
        if _plain_dir(entry) and entry.name == "stats":
            foreign += _foreign_in_stats(entry.path, "stats/")
        elif _plain_dir(entry) and entry.name == "additional_chat_templates":  # tokenizer's
            foreign += [f"{entry.name}/{e.name}" for e in _entries(entry.path)
                        if not (_plain_file(e) and e.name.endswith(".jinja"))]
        elif _plain_dir(entry) and entry.name == "__pycache__":  # from importing modeling_*.py
            foreign += [f"{entry.name}/{e.name}" for e in _entries(entry.path)
                        if not (_plain_file(e) and re.fullmatch(r"modeling_\w+\.[\w.-]+\.pyc", e.name))]
        else:
            foreign.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return foreign


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _has_model_marker(directory: str) -> bool:
    config = os.path.join(directory, "config.json")
    data = _read_json(config) if os.path.isfile(config) and not os.path.islink(config) else None
    return isinstance(data, dict) and isinstance(data.get("compression"), dict)


def is_stats_dir(path: str) -> bool:
    """A statistics directory written by step 1: meta.json with the stats keys, nothing foreign."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    meta = _read_json(os.path.join(path, "meta.json"))
    return isinstance(meta, dict) and all(k in meta for k in STATS_KEYS) and not _foreign_in_stats(path)


def is_our_pt(path: str) -> bool:
    """A single-file model written by save_compressed (a torch.save dict with our keys)."""
    if os.path.islink(path) or not os.path.isfile(path) or not path.endswith(".pt"):
        return False
    import torch
    try:  # mmap: the tensors are not read, so this is cheap even for a large file
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip, not ours, or damaged: in every case not ours to replace
        return False
    return isinstance(blob, dict) and all(k in blob for k in PT_KEYS)


def foreign_entries(path: str) -> list[str]:
    """Entries of directory `path` this tool never writes, sorted: judged by the statistics
    names if any entry is one (meta.json, layer_*, plan_*: a finished or half-written step 1),
    else by the model directory's names."""
    stats_like = any(_known_file(e.name, STATS_FILES, STATS_FILE_PATTERNS)
                     and not _known_file(e.name, MODEL_FILES, MODEL_FILE_PATTERNS) for e in _entries(path))
    return _foreign_in_stats(path) if stats_like else _foreign_in_model(path)


def judge_directory(path: str) -> str | None:
    """What a directory holds: "empty", "stats_only" (a model dir around our stats/), "model",
    "stats", or None when it is not (only) ours."""
    entries = _entries(path)
    if not entries:
        return "empty"
    if is_stats_dir(path):
        return "stats"
    if _foreign_in_model(path):
        return None
    if _has_model_marker(path):
        return "model"
    names = [e.name for e in entries]
    if names == ["stats"] and (is_stats_dir(os.path.join(path, "stats")) or not _entries(os.path.join(path, "stats"))):
        return "stats_only"
    return None


def _list(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


# ---------------------------------------------------------------------------------------- the check

def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_path(path: str, kind: str, overwrite: bool, protected: Iterable[str] = ()) -> None:
    """Raise OutputError unless writing `kind` ("model" or "stats") at `path` loses nothing the
    user did not ask to replace. Run it before any work, so a refusal costs nothing. A missing
    `path` that a killed run's replacement left as temporaries is put back first
    (recover_interrupted_swap), so what is judged is that output."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    what = "compressed model" if kind == "model" else "statistics directory"
    real = os.path.realpath(path)
    for entry in protected:
        if not entry or not os.path.exists(entry):
            continue  # a hub id or a preset name: nothing on disk to protect
        guarded = os.path.realpath(entry)
        if _inside(real, guarded) if os.path.isdir(guarded) else real == guarded:
            raise OutputError(f"{path} is the input model {entry} or inside it; "
                              f"choose an output path outside it")
        if _inside(guarded, real):
            raise OutputError(f"{path} contains the input model {entry}; choose an output path that does not")
    if os.path.islink(path):
        raise OutputError(f"{path} is a symbolic link; pass the path it points to, or choose another path")
    if not os.path.exists(path) and not recover_interrupted_swap(path):
        return
    if os.path.isdir(path):
        if kind == "model" and path.endswith(".pt"):
            raise OutputError(f"{path} is a directory, but a .pt model is a single file; choose another path")
        judged = judge_directory(path)
        if judged == "empty" or (kind == "model" and judged == "stats_only"):
            return
        if judged == ("model" if kind == "model" else "stats"):
            if overwrite:
                return
            raise OutputError(f"{path} already holds a {what} from an earlier run; "
                              f"pass --overwrite to replace it, or choose another path")
        if judged in ("model", "stats"):
            other = "compressed model" if judged == "model" else "statistics directory"
            raise OutputError(f"{path} holds a {other} from this tool, not a {what}; choose another path")
        foreign = foreign_entries(path)
        detail = (f"contains {_list(foreign)}, which this tool did not write" if foreign
                  else f"is not a {what} written by this tool")
        raise OutputError(f"{path} {detail}; choose another path (--overwrite never replaces it)")
    if kind == "model" and is_our_pt(path):
        if overwrite:
            return
        raise OutputError(f"{path} already holds a {what} from an earlier run; "
                          f"pass --overwrite to replace it, or choose another path")
    raise OutputError(f"{path} is an existing file that this tool did not write as a {what}; "
                      f"choose another path (--overwrite never replaces it)")


# ---------------------------------------------------------------------------------------- stale temporaries

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "unknown"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name ([0] state, [19] start time), or None
    where there is no /proc or the process is hidden from us."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ")"
    except (OSError, IndexError):
        return None


def temporary_token() -> str:
    """This process's TOKEN for the names of its temporaries: PID-START@HOST."""
    fields = _proc_stat(os.getpid())
    return f"{os.getpid()}-{fields[19] if fields else 0}@{_host()}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _running_here(pid: int, start: int) -> bool:
    """Whether the process `pid` of this host that started at `start` still runs; a pid reused by
    a later process does not count, nor does a zombie."""
    if not _alive(pid):
        return False
    fields = _proc_stat(pid)
    if fields is None:  # no /proc (or hidden from us): the pid alone decides
        return True
    return fields[0] != "Z" and (start == 0 or int(fields[19]) == start)


def _owner(match: re.Match) -> str:
    """Who left a temporary: "dead" (a killed run of this host: ours to clean up), "running" (a run
    of this host at work), "elsewhere" (a run on another host, which we cannot check) or
    "unmarked" (an earlier version's name, which says no host)."""
    pid, start, host = match.group(3, 4, 5)
    if host is None:
        return "unmarked"
    if host != _host():
        return "elsewhere"
    return "running" if _running_here(int(pid), int(start)) else "dead"


def _temporaries(path: str) -> list[tuple[str, re.Match]]:
    """PATH's temporaries (their paths and name matches), sorted by name."""
    directory, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + _TEMPORARY)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [(os.path.join(directory, name), match) for name in names if (match := pattern.fullmatch(name))]


def _real_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def recover_interrupted_swap(path: str) -> str | None:
    """Put back an output that a run killed between the two renames of a directory replacement
    (PATH -> PATH.old-TOKEN, PATH.partial-TOKEN -> PATH) left only as temporaries; return the
    temporary moved to PATH, or None. PATH.old-TOKEN is created only once the new output is
    complete, so with both present the replacement is completed; with the old one alone, it is
    restored. Only a killed run of this host is touched, and only while PATH does not exist."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return None
    for old, match in _temporaries(path):
        if match.group(1) != "old" or not _real_dir(old) or _owner(match) != "dead":
            continue
        new = f"{path}.partial-{match.group(2)}"
        if _real_dir(new):
            os.replace(new, path)
            print(f"completed the replacement of {path} that a killed run left half done: "
                  f"moved its new output {new} into place")
            return new
        os.replace(old, path)
        print(f"restored {path} from {old}, where a run killed while replacing it had moved it")
        return old
    return None


def _rescue_stats(stale: str, path: str) -> None:
    # a run killed while replacing a model directory may have moved step 1's stats/ into its
    # temporary already; put them back where the next write of PATH keeps them (KEEP_SUBDIRS)
    stats, target = os.path.join(stale, "stats"), os.path.join(path, "stats")
    if not is_stats_dir(stats) or os.path.lexists(target) or (os.path.lexists(path) and not os.path.isdir(path)):
        return
    os.makedirs(path, exist_ok=True)
    os.replace(stats, target)
    print(f"moved the statistics in stale {stale} back to {target}")


def clean_stale_partials(path: str) -> list[str]:
    """Remove PATH.partial-TOKEN / PATH.old-TOKEN left by killed runs of this host and return
    them, once recover_interrupted_swap has put back an output a kill left only as temporaries.
    A running process's temporaries are its work in progress and stay (a pid reused since does
    not count as running); another host's and an earlier version's unmarked ones stay too, with
    a printed line each, since nothing here can tell whether their run has ended. A stale
    directory holding files this tool never writes is kept too, with a printed warning."""
    path = os.path.abspath(path)
    recover_interrupted_swap(path)
    removed: list[str] = []
    for stale, match in _temporaries(path):
        owner = _owner(match)
        if owner == "running":
            continue
        if owner == "elsewhere":
            print(f"kept {stale}: a temporary of a run on host {match.group(5)}, which this host cannot "
                  f"check; remove it by hand once that run has ended")
            continue
        if owner == "unmarked":
            print(f"kept {stale}: a temporary of an earlier version, which did not record its host; "
                  f"remove it by hand if no run on any host is writing {path}")
            continue
        if _real_dir(stale):
            foreign = foreign_entries(stale)
            if foreign:
                print(f"kept stale {stale}: it contains {_list(foreign)}, which this tool did not write; "
                      f"remove it by hand")
                continue
            _rescue_stats(stale, path)
            shutil.rmtree(stale)
        else:
            os.remove(stale)
        removed.append(stale)
    if removed:
        print(f"removed {len(removed)} stale partial output(s) of killed runs: {', '.join(removed)}")
    return removed
