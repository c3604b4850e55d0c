"""Calibration windows and evaluation text.

A dataset is named by --dataset / --eval_datasets:
  wikitext2, ptb, c4   the Hugging Face sets used by GPTQ and SVD-LLM (need the hub or its cache)
  pydoc                Python's own documentation (pydoc_data.topics): offline, always present
  random               seeded random token ids (timing and memory runs only)
  PATH                 a local file: .json/.jsonl rows with a "text" field, anything else plain text,
                       or chat data (below)
Any of them may end in a slice of its text, by fraction of lines: `wiki.valid.tokens[0:0.8]`
for calibration and `wiki.valid.tokens[0.8:1]` for a held-back evaluation slice.

Chat data (calibration only): a .json/.jsonl file whose first row has "instruction" and "output"
(Alpaca: instruction, input, output) or "messages" (a list of {"role", "content"}). Every row is a
conversation rendered with the tokenizer's chat template, the assistant's answer included
(`render_conversation`); a slice is by fraction of rows. Windows are whole conversations packed
in seeded order (`pack_conversations`).
"""
from __future__ import annotations

import json
import os
import re
import socket
from collections import deque

import torch

HUB_DATASETS = ("wikitext2", "ptb", "c4")
ALPACA_FIELDS = ("instruction", "output")  # "input" may be missing or empty
# The Alpaca-LoRA template (SVD-LLM's LoRA prompter): how chat data is rendered for a tokenizer
# without a chat template, and step 7's template for Alpaca rows.
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PACK_LOOKAHEAD = 64  # conversations searched for one that fits a window's remaining room
BUILTIN_DATASETS = HUB_DATASETS + ("pydoc", "random")
SELF_DATASET = "self"  # text the model writes itself (utils.self_calibration)
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


def validate_dataset(spec: str, text_only: bool = False) -> None:
    """Cheap checks before any model is loaded; a chat data set is read and every row checked.
    text_only: the spec is for evaluation text, where chat data and 'self' have no place."""
    name, _, _ = parse_dataset(spec)
    if name == SELF_DATASET and not os.path.isfile(name):
        if text_only:
            raise DatasetError("dataset 'self' is generated calibration text: evaluate on a text file or pydoc")
        return
    if name in BUILTIN_DATASETS:
        return
    if not os.path.isfile(name):
        raise DatasetError(f"dataset {name!r} is neither one of {', '.join(BUILTIN_DATASETS + (SELF_DATASET,))} "
                           f"nor an existing file")
    if not name.endswith((".json", ".jsonl")):
        return
    rows = read_json_rows(name)
    form = chat_format(rows)
    if form is None:
        if not rows or not isinstance(rows[0], dict) or "text" not in rows[0]:
            raise DatasetError(f"{name}: JSON rows need a 'text' field, or chat fields ('instruction' and "
                               f"'output', or 'messages')")
        return
    if text_only:
        raise DatasetError(f"{name}: chat data ({form} rows) is for calibration (--dataset), rendered with the "
                           f"chat template; evaluate on a text file")
    check_chat_rows(name, rows, form)


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


def read_json_rows(path: str) -> list:
    """The rows of a .json file (an array) or a .jsonl file (one value a line)."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.read(1)
            handle.seek(0)
            return json.load(handle) if first == "[" else [json.loads(line) for line in handle if line.strip()]
    except ValueError as error:
        raise DatasetError(f"{path}: not readable JSON / JSON lines ({error})") from None


def _file_text(path: str) -> str:
    if path.endswith((".json", ".jsonl")):
        rows = read_json_rows(path)
        if chat_format(rows):
            raise DatasetError(f"{path}: chat data is rendered with the chat template for calibration "
                               f"(--dataset), it has no plain text: use a text file here")
        if not rows or not isinstance(rows[0], dict) or "text" not in rows[0]:
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
    """nsamples x seq_len token ids (same seed, same windows; the first n of a larger draw are the n
    of a smaller one); see calibration_data."""
    return calibration_data(spec, tokenizer, nsamples, seq_len, seed, vocab_size)[0]


def calibration_data(spec: str, tokenizer, nsamples: int, seq_len: int, seed: int,
                     vocab_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """(nsamples x seq_len token ids, what they are). Text: windows at seeded random offsets; chat
    data: whole conversations packed in seeded order (chat_windows); random: seeded random ids."""
    name = parse_dataset(spec)[0]
    if name == "random":
        if vocab_size is None:
            raise DatasetError("dataset 'random' needs the model's vocabulary size")
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (nsamples, seq_len), generator=generator), {"dataset": spec, "kind": "random"}
    _check_tokenizable(spec, tokenizer)
    if is_chat_dataset(spec):
        return chat_windows(spec, tokenizer, nsamples, seq_len, seed)
    ids = _calibration_ids(spec, tokenizer, seq_len)
    starts = window_starts(ids.numel(), nsamples, seq_len, seed)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()]), {"dataset": spec, "kind": "text"}


def _check_tokenizable(spec: str, tokenizer) -> None:
    """DatasetError for 'self' (written by the model, not read) and for a model without a tokenizer."""
    name = parse_dataset(spec)[0]
    if name == SELF_DATASET and not os.path.isfile(name):
        raise DatasetError("dataset 'self' is written by the model: use utils.self_calibration.self_calibration_data")
    if tokenizer is None:
        raise DatasetError(f"the model has no tokenizer, so dataset {spec!r} cannot be tokenized: "
                           f"use --dataset random")


def _calibration_ids(spec: str, tokenizer, seq_len: int) -> torch.Tensor:
    """The token ids of a calibration text, at least one window long."""
    _check_tokenizable(spec, tokenizer)
    ids = tokenize(tokenizer, load_text(spec, "train"))
    if ids.numel() <= seq_len:
        raise DatasetError(f"dataset {spec!r} has {ids.numel()} tokens, fewer than one window of "
                           f"{seq_len}: lower --model_seq_len or use a longer text")
    return ids


# ---------------------------------------------------------------------------------------- chat data

def chat_format(rows: list) -> str | None:
    """'alpaca' or 'messages' when the first row has those fields (chat data), else None."""
    first = rows[0] if rows else None
    if not isinstance(first, dict):
        return None
    if "messages" in first:
        return "messages"
    return "alpaca" if all(k in first for k in ALPACA_FIELDS) else None


def is_chat_dataset(spec: str) -> bool:
    name = parse_dataset(spec)[0]
    return name.endswith((".json", ".jsonl")) and os.path.isfile(name) and chat_format(read_json_rows(name)) is not None


def check_chat_rows(path: str, rows: list, form: str) -> None:
    """DatasetError naming the first row (counted from 1) that lacks a field of its format."""
    for number, row in enumerate(rows, 1):
        if form == "alpaca":
            for field in ALPACA_FIELDS:
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise DatasetError(f"{path}: row {number} has no string '{field}' (Alpaca rows: instruction, "
                                       f"optional input, output); fix or remove that row")
            if row.get("input") is not None and not isinstance(row["input"], str):
                raise DatasetError(f"{path}: row {number}: 'input' must be a string")
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{path}: row {number} has no 'messages' list (chat rows: \"messages\": "
                               f"[{{\"role\": ..., \"content\": ...}}, ...]); fix or remove that row")
        for turn, message in enumerate(messages, 1):
            for field in ("role", "content"):
                if not isinstance(message, dict) or not isinstance(message.get(field), str):
                    raise DatasetError(f"{path}: row {number}, message {turn} has no string '{field}' (each "
                                       f"message needs role and content); fix or remove that row")


def conversation(row: dict, form: str) -> list[dict]:
    """A row as chat messages: an Alpaca row is one user turn (instruction, then its input after a
    blank line) and the assistant's output."""
    if form == "alpaca":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_chat_text(messages: list[dict], eos: str = "") -> str:
    """A conversation for a tokenizer without a chat template: the Alpaca template's
    "### Instruction:" / "### Response:" blocks (a single turn reads exactly as Alpaca-LoRA's
    prompt without input, then the answer and EOS); a system message replaces the preamble."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    parts = ["\n\n".join(system) if system else ALPACA_PROMPT_NO_INPUT.split("\n\n")[0]]
    for message in messages:
        if message["role"] == "assistant":
            parts.append(f"### Response:\n{message['content']}{eos}")
        elif message["role"] != "system":
            parts.append(f"### Instruction:\n{message['content']}")
    return "\n\n".join(parts)


def _conversation_text(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return plain_chat_text(messages, tokenizer.eos_token or "") + ("\n\n### Response:\n" if generation_prompt else "")


def _conversation_ids(tokenizer, text: str) -> list[int]:
    # a chat template's text carries BOS where the model wants one: no special tokens are added to it
    return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


def render_conversation(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation, the assistant's turns included: the tokenizer's chat
    template, else plain_chat_text."""
    return _conversation_ids(tokenizer, _conversation_text(tokenizer, messages))


def assistant_token_mask(tokenizer, messages: list[dict], ids: list[int]) -> list[bool] | None:
    """True on the tokens of `ids` (render_conversation's) that the assistant's turns add: each
    turn is what the conversation through it renders beyond the conversation before it with the
    generation prompt. None when the template does not render those as prefixes of the whole."""
    mask = [False] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _conversation_ids(tokenizer, _conversation_text(tokenizer, messages[:turn], generation_prompt=True))
            through = _conversation_ids(tokenizer, _conversation_text(tokenizer, messages[:turn + 1]))
        except Exception:  # a template that refuses a partial conversation (e.g. one not starting with user)
            return None
        if ids[:len(before)] != before or ids[:len(through)] != through:
            return None
        mask[len(before):len(through)] = [True] * (len(through) - len(before))
    return mask


def pack_conversations(count: int, tokens_of, nsamples: int, seq_len: int, seed: int,
                       used: set[int] | None = None) -> tuple[torch.Tensor, dict]:
    """nsamples windows of seq_len ids from conversations 0..count-1 (tokens_of(i) -> ids), taken in
    a seeded random order and placed whole: each window starts with a conversation and is filled
    with the next ones that fit its remaining room (the first that fits among the next
    PACK_LOOKAHEAD). A conversation longer than a window starts one and is cut at its end. When
    none fits the room left, the start of the next conversation that fits a window fills it, cut
    (windows have no padding); that conversation is not used again. When the data set runs short, a new seeded
    order of all its conversations follows (the record says whether any was reused).
    used: a set that receives the index of every conversation placed (whole or cut)."""
    generator = torch.Generator().manual_seed(seed)
    queue: deque[int] = deque()
    placed: set[int] = set()
    counts = {"whole": 0, "longer_than_window": 0, "tail_fillers": 0, "tail_filler_tokens": 0}
    reused = False
    windows = []
    for _ in range(nsamples):
        window: list[int] = []
        while len(window) < seq_len:
            if len(queue) < PACK_LOOKAHEAD:
                queue.extend(torch.randperm(count, generator=generator).tolist())
            room = seq_len - len(window)
            ahead = range(min(PACK_LOOKAHEAD, len(queue)))
            take = 0 if not window else next((k for k in ahead if len(tokens_of(queue[k])) <= room), None)
            if take is None:  # the filler: a conversation that fits a window (a longer one starts the next)
                take = next((k for k in ahead if len(tokens_of(queue[k])) <= seq_len), 0)
            index = queue[take]
            del queue[take]
            reused |= index in placed
            placed.add(index)
            ids = tokens_of(index)
            if len(ids) <= room:
                counts["whole"] += 1
            elif not window:
                counts["longer_than_window"] += 1
            else:
                counts["tail_fillers"] += 1
                counts["tail_filler_tokens"] += room
            window += ids[:room]
        windows.append(window)
    if used is not None:
        used.update(placed)
    return torch.tensor(windows, dtype=torch.long), {**counts, "reused": reused}


def chat_windows(spec: str, tokenizer, nsamples: int, seq_len: int, seed: int,
                 used: set[int] | None = None) -> tuple[torch.Tensor, dict]:
    """Calibration windows of a chat data set (see pack_conversations), the slice by fraction of
    rows; each row rendered once, when it is first looked at. used: receives the indices (in the
    slice) of the conversations placed."""
    rows, form, tokens_of = _chat_rows(spec, tokenizer)
    windows, packing = pack_conversations(len(rows), tokens_of, nsamples, seq_len, seed, used)
    return windows, _chat_info(spec, tokenizer, rows, form, packing)


def _chat_info(spec: str, tokenizer, rows: list, form: str, packing: dict) -> dict:
    template = "chat_template" if has_chat_template(tokenizer) else "alpaca (the tokenizer has no chat template)"
    return {"dataset": spec, "kind": "chat", "format": form, "template": template, "rows": len(rows),
            "packing": packing}


def _chat_rows(spec: str, tokenizer):
    """(the rows of a chat data set's slice, their format, tokens_of(index) rendering each once)."""
    name, start, end = parse_dataset(spec)
    rows = read_json_rows(name)
    form = chat_format(rows)
    check_chat_rows(name, rows, form)
    rows = rows[int(start * len(rows)):int(end * len(rows))]
    if not rows:
        raise DatasetError(f"dataset {spec!r}: the slice holds no rows; widen it")
    rendered: dict[int, list[int]] = {}

    def tokens_of(index: int) -> list[int]:
        if index not in rendered:
            rendered[index] = render_conversation(tokenizer, conversation(rows[index], form))
        return rendered[index]

    return rows, form, tokens_of


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
    `heldout` (those a pass only measures on), drawn apart from these `nsamples` windows' own draw
    and from each `exclude` draw (nsamples, seq_len, seed) of the same data set, e.g. step 1's
    (see calibration_data_with_heldout). Returns the windows and a record of how the held-out ones
    were drawn."""
    windows, _, record = calibration_data_with_heldout(spec, tokenizer, nsamples, seq_len, seed, heldout, exclude,
                                                       vocab_size)
    return windows, record


def calibration_data_with_heldout(spec: str, tokenizer, nsamples: int, seq_len: int, seed: int,
                                  heldout: list[int], exclude: list[tuple[int, int, int]] = (),
                                  vocab_size: int | None = None) -> tuple[torch.Tensor, dict, dict]:
    """calibration_data(spec, ..., nsamples, seq_len, seed), except the windows at positions
    `heldout`, drawn with seed + HELDOUT_SEED_OFFSET so that they share nothing with these
    `nsamples` windows' own draw nor with the windows of each `exclude` draw (nsamples, seq_len,
    seed) of the same data set. Text: offsets whose window shares no token with those windows.
    Chat data: whole conversations that none of those windows uses, packed in their own seeded
    order. Random ids: ids from their own seed. Returns (windows, what calibration_data says they
    are, the record of how the held-out ones were drawn)."""
    heldout = sorted(set(heldout))
    record = {"positions": heldout, "seed": seed + HELDOUT_SEED_OFFSET}
    if not heldout or parse_dataset(spec)[0] == "random":
        windows, info = calibration_data(spec, tokenizer, nsamples, seq_len, seed, vocab_size)
        if heldout:  # random token ids: another generator is other windows
            generator = torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)
            windows[heldout] = torch.randint(0, vocab_size, (len(heldout), seq_len), generator=generator)
            record["drawn"] = "random token ids from their own seed"
        return windows, info, record
    _check_tokenizable(spec, tokenizer)
    if is_chat_dataset(spec):
        return _chat_with_heldout(spec, tokenizer, nsamples, seq_len, seed, heldout, exclude, record)
    ids = _calibration_ids(spec, tokenizer, seq_len)
    windows = torch.stack([ids[s:s + seq_len] for s in window_starts(ids.numel(), nsamples, seq_len, seed).tolist()])
    draws = [(nsamples, seq_len, seed), *((n, length, s) for n, length, s in exclude if ids.numel() > length)]
    starts, free = disjoint_starts(ids.numel(), len(heldout), seq_len, seed + HELDOUT_SEED_OFFSET,
                                   [(window_starts(ids.numel(), n, length, s), length) for n, length, s in draws])
    windows[heldout] = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return windows, {"dataset": spec, "kind": "text"}, {
        **record, "starts": starts.tolist(), "free_starts": free,
        "disjoint_from": [{"nsamples": n, "seq_len": length, "seed": s} for n, length, s in draws],
        "drawn": "offsets whose window shares no token with any window of the disjoint_from draws"}


def _chat_with_heldout(spec: str, tokenizer, nsamples: int, seq_len: int, seed: int, heldout: list[int],
                       exclude, record: dict) -> tuple[torch.Tensor, dict, dict]:
    """Chat data: the windows of chat_windows, the held-out positions replaced by windows packed
    (pack_conversations, seed + HELDOUT_SEED_OFFSET) from the conversations that no window of
    this draw nor of an `exclude` draw places, whole or cut."""
    rows, form, tokens_of = _chat_rows(spec, tokenizer)
    excluded: set[int] = set()
    windows, packing = pack_conversations(len(rows), tokens_of, nsamples, seq_len, seed, excluded)
    draws = [(nsamples, seq_len, seed), *exclude]
    for n, length, s in exclude:
        pack_conversations(len(rows), tokens_of, n, length, s, excluded)
    left = [i for i in range(len(rows)) if i not in excluded]
    if not left:
        raise DatasetError(f"dataset {spec!r}: every one of its {len(rows)} conversations is in a calibration "
                           f"window, so held-out windows cannot be drawn apart from them: use more rows or "
                           f"fewer windows")
    placed: set[int] = set()
    held, held_packing = pack_conversations(len(left), lambda i: tokens_of(left[i]), len(heldout), seq_len,
                                            seed + HELDOUT_SEED_OFFSET, placed)
    windows[heldout] = held
    return windows, _chat_info(spec, tokenizer, rows, form, packing), {
        **record, "conversations_excluded": len(excluded), "conversations_left": len(left),
        "conversations": sorted(left[i] for i in placed), "packing": held_packing,
        "disjoint_from": [{"nsamples": n, "seq_len": length, "seed": s} for n, length, s in draws],
        "drawn": "whole conversations that no window of the disjoint_from draws places, packed in their own "
                 "seeded order (reused: one of them fills more than one held-out window)"}
