"""Calibration windows and evaluation text.

A dataset is named by --dataset / --eval_datasets:
  wikitext2, ptb, c4   the Hugging Face sets used by GPTQ and SVD-LLM (need the hub or its cache)
  pydoc                Python's own documentation (pydoc_data.topics): offline, always present
  random               seeded random token ids (timing and memory runs only)
  PATH                 a local file: .json/.jsonl rows with a "text" field, anything else plain text
Any of them may end in a slice of its text, by fraction of lines: `wiki.valid.tokens[0:0.8]`
for calibration and `wiki.valid.tokens[0.8:1]` for a held-back evaluation slice.
"""
from __future__ import annotations

import json
import os
import re
import socket

import torch

HUB_DATASETS = ("wikitext2", "ptb", "c4")
BUILTIN_DATASETS = HUB_DATASETS + ("pydoc", "random")
_SLICE = re.compile(r"^(?P<name>.+?)\[(?P<start>[0-9.]*):(?P<end>[0-9.]*)\]$")


class DatasetError(ValueError):
    """A dataset that cannot be read; the message says what to use instead."""


def parse_dataset(spec: str) -> tuple[str, float, float]:
    """'name[a:b]' -> (name, a, b); no slice -> (name, 0, 1)."""
    match = _SLICE.match(spec)
    if not match:
        return spec, 0.0, 1.0
    start = float(match["start"] or 0.0)
    end = float(match["end"] or 1.0)
    if not 0.0 <= start < end <= 1.0:
        raise DatasetError(f"dataset slice [{start}:{end}] must satisfy 0 <= start < end <= 1")
    return match["name"], start, end


def validate_dataset(spec: str) -> None:
    """Cheap checks before any model is loaded."""
    name, _, _ = parse_dataset(spec)
    if name in BUILTIN_DATASETS:
        return
    if not os.path.isfile(name):
        raise DatasetError(f"dataset {name!r} is neither one of {', '.join(BUILTIN_DATASETS)} "
                           f"nor an existing file")


def check_hub_datasets(specs: dict[str, str]) -> None:
    """Before any step runs: DatasetError if a hub data set is asked for and the hub cannot be
    reached. specs: flag -> comma list of specs, e.g. {"--eval_datasets": "wikitext2,pydoc"}."""
    needing = [(flag, name) for flag, value in specs.items() for name in
               (parse_dataset(s)[0] for s in value.split(",")) if name in HUB_DATASETS]
    if needing and not _hub_reachable():
        flag, name = needing[0]
        raise DatasetError(f"{flag} {name} needs the Hugging Face hub, which cannot be reached: use a local "
                           f"file (e.g. ../shared/data/wikitext2/wiki.valid.tokens, sliced as FILE[0.8:1]) or pydoc")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return True  # the user says the data sets are in the local cache
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_text(name: str, split: str) -> str:
    """Text of a hub data set: split is 'train' (calibration) or 'test' (evaluation)."""
    if not _hub_reachable():
        raise DatasetError(f"dataset {name!r} needs the Hugging Face hub, which cannot be reached: "
                           f"use --dataset FILE (e.g. ../shared/data/wikitext2/wiki.valid.tokens) "
                           f"or --dataset pydoc")
    from datasets import load_dataset
    if name == "wikitext2":
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    elif name == "ptb":
        rows = load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
    else:  # c4: one training shard for calibration, GPTQ's validation subset for evaluation
        if split == "train":
            rows = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                split="train")["text"][:20000]
        else:
            rows = load_dataset("allenai/c4", data_files={
                "validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")["text"][:1100]
    return "\n\n".join(rows)


def _pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def _file_text(path: str) -> str:
    if path.endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as handle:
            first = handle.read(1)
            handle.seek(0)
            rows = json.load(handle) if first == "[" else [json.loads(line) for line in handle if line.strip()]
        if not rows or "text" not in rows[0]:
            raise DatasetError(f"{path}: JSON rows need a 'text' field")
        return "\n\n".join(row["text"] for row in rows)
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def load_text(spec: str, split: str) -> str:
    """The text of a dataset spec; split 'train' or 'test' matters only for hub sets."""
    name, start, end = parse_dataset(spec)
    if name in HUB_DATASETS:
        text = _hub_text(name, split)
    elif name == "pydoc":
        text = _pydoc_text()
    elif name == "random":
        raise DatasetError("dataset 'random' has no text (it is random token ids)")
    else:
        validate_dataset(name)
        text = _file_text(name)
    if (start, end) != (0.0, 1.0):
        lines = text.splitlines(keepends=True)
        text = "".join(lines[int(start * len(lines)):int(end * len(lines))])
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids (no truncation; the length warning is irrelevant here)."""
    previous = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = int(1e12)
    try:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    finally:
        if previous is not None:
            tokenizer.model_max_length = previous


def calibration_windows(spec: str, tokenizer, nsamples: int, seq_len: int, seed: int,
                        vocab_size: int | None = None) -> torch.Tensor:
    """nsamples x seq_len token ids at seeded random offsets (same seed, same windows; the first n
    of a larger draw are the n of a smaller one)."""
    if parse_dataset(spec)[0] == "random":
        if vocab_size is None:
            raise DatasetError("dataset 'random' needs the model's vocabulary size")
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (nsamples, seq_len), generator=generator)
    ids = _calibration_ids(spec, tokenizer, seq_len)
    starts = window_starts(ids.numel(), nsamples, seq_len, seed)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def _calibration_ids(spec: str, tokenizer, seq_len: int) -> torch.Tensor:
    """The token ids of a calibration text, at least one window long."""
    if tokenizer is None:
        raise DatasetError(f"the model has no tokenizer, so dataset {spec!r} cannot be tokenized: "
                           f"use --dataset random")
    ids = tokenize(tokenizer, load_text(spec, "train"))
    if ids.numel() <= seq_len:
        raise DatasetError(f"dataset {spec!r} has {ids.numel()} tokens, fewer than one window of "
                           f"{seq_len}: lower --model_seq_len or use a longer text")
    return ids


# Held-out windows (what the update's and the refinement's held-out checks measure on) come from their
# own generator, seed + this, among the offsets whose window shares no token with the windows that
# were fitted on (step 1's statistics, the fit windows): a held-out check on seen text is no check.
HELDOUT_SEED_OFFSET = 7919


def window_starts(num_tokens: int, nsamples: int, seq_len: int, seed: int) -> torch.Tensor:
    """The start offsets calibration_windows draws in a text of `num_tokens` tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - seq_len, (nsamples,), generator=generator)


def disjoint_starts(num_tokens: int, nsamples: int, seq_len: int, seed: int,
                    exclude: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    """`nsamples` starts of `seq_len`-token windows that share no token with any excluded window
    (starts, length), drawn uniformly (generator seeded `seed`) among the starts that qualify;
    also returns how many starts qualified."""
    limit = num_tokens - seq_len  # starts are in [0, limit), as calibration_windows draws them
    cover = torch.zeros(limit + 1, dtype=torch.int64)  # +1 / -1 at each excluded interval's ends
    for starts, length in exclude:
        ones = torch.ones_like(starts)
        cover.index_add_(0, (starts - seq_len + 1).clamp(0, limit), ones)
        cover.index_add_(0, (starts + length).clamp(0, limit), -ones)
    free = (cover.cumsum(0)[:limit] == 0).nonzero().squeeze(1)
    if free.numel() == 0:
        raise DatasetError(f"no window of {seq_len} tokens is left that the calibration windows do not "
                           f"overlap, so held-out windows cannot be drawn: use a longer text or fewer windows")
    generator = torch.Generator().manual_seed(seed)
    return free[torch.randint(0, free.numel(), (nsamples,), generator=generator)], int(free.numel())


def calibration_windows_with_heldout(spec: str, tokenizer, nsamples: int, seq_len: int, seed: int,
                                     heldout: list[int], exclude: list[tuple[int, int, int]] = (),
                                     vocab_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """calibration_windows(spec, ..., nsamples, seq_len, seed), except the windows at positions
    `heldout` (those a pass only measures on): drawn with seed + HELDOUT_SEED_OFFSET among the
    offsets whose window shares no token with these `nsamples` windows' own draw nor with the
    windows of each `exclude` draw (nsamples, seq_len, seed) of the same text, e.g. step 1's.
    Returns the windows and a record of how the held-out ones were drawn."""
    heldout = sorted(set(heldout))
    record = {"positions": heldout, "seed": seed + HELDOUT_SEED_OFFSET}
    if not heldout or parse_dataset(spec)[0] == "random":
        windows = calibration_windows(spec, tokenizer, nsamples, seq_len, seed, vocab_size)
        if heldout:  # random token ids: another generator is other windows
            generator = torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)
            windows[heldout] = torch.randint(0, vocab_size, (len(heldout), seq_len), generator=generator)
            record["drawn"] = "random token ids from their own seed"
        return windows, record
    ids = _calibration_ids(spec, tokenizer, seq_len)
    windows = torch.stack([ids[s:s + seq_len] for s in window_starts(ids.numel(), nsamples, seq_len, seed).tolist()])
    draws = [(nsamples, seq_len, seed), *((n, length, s) for n, length, s in exclude if ids.numel() > length)]
    starts, free = disjoint_starts(ids.numel(), len(heldout), seq_len, seed + HELDOUT_SEED_OFFSET,
                                   [(window_starts(ids.numel(), n, length, s), length) for n, length, s in draws])
    windows[heldout] = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return windows, {**record, "starts": starts.tolist(), "free_starts": free,
                     "disjoint_from": [{"nsamples": n, "seq_len": length, "seed": s} for n, length, s in draws],
                     "drawn": "offsets whose window shares no token with any window of the disjoint_from draws"}
