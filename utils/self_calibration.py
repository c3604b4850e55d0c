"""Self-calibration (Williams, Chrysostomou and Aletras, "Self-calibration for Language Model
Quantization and Pruning", NAACL 2025, arXiv 2410.17170): the original model writes its own
calibration text, so no outside data is needed and the text follows the model's own distribution.

Each sequence starts from the beginning-of-sequence token alone (the paper's start), or, for a
tokenizer with a chat template, from a user turn and the assistant's header: a prompt of
`prompts` (in turn) or an empty user turn. It is then sampled with the KV cache for exactly
seq_len tokens in all: generation does not stop at EOS, so a chat model ends its turn and goes on
to write further turns itself. Temperature follows the paper's linear schedule, from
temperature_start to temperature_end over the first schedule_tokens tokens (a hotter start makes
the sequences begin differently; its exact values could not be checked here, so the default is a
constant 1.0, the model's own distribution), with nucleus sampling (top_p 0.95: the 5% tail of
unlikely tokens, which small models sample badly, is cut) throughout. Sequence i samples from its
own torch.Generator seeded from (seed, i), so a seed gives the same ids whatever the batch size
(up to floating-point differences between batch shapes), and the first n sequences of a larger
cache are those a run of n would write, and a cache of k < n rows is extended by generating rows
k..n-1 only (rows after step 1's are step 3's held-out text: compress.py, _self_step3_windows).

The ids are cached in a safetensors file with a JSON of the settings and a fingerprint of the
weights (`cached_sequences`, `save_sequences`), so a later step or run with the same settings and
the same original model reads them instead of generating again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from utils.data import DatasetError, has_chat_template
from utils.model import cache_keyword, cache_of, weights_fingerprint

CACHE_FILE = "self_calibration.safetensors"
SETTINGS_FILE = "self_calibration.json"


@dataclass
class SelfCalibrationOptions:
    temperature_start: float = 1.0  # the paper's schedule: a higher start (e.g. 1.5) for more varied openings
    temperature_end: float = 1.0
    schedule_tokens: int = 32  # generated tokens over which the temperature moves from start to end
    top_p: float = 0.95
    batch_size: int = 16
    prompts: tuple[str, ...] = ()  # user turns for a chat model (in turn); none: an empty user turn

    def check(self) -> None:
        if not (self.temperature_start > 0 and self.temperature_end > 0):
            raise DatasetError(f"--self_temperature {self.temperature_start:g}:{self.temperature_end:g}: "
                               f"temperatures must be > 0, e.g. 1.5:1.0")
        if not 0 < self.top_p <= 1:
            raise DatasetError(f"--self_top_p {self.top_p}: must be in (0, 1], e.g. 0.95")
        if self.schedule_tokens < 0 or self.batch_size < 1:
            raise DatasetError("self-calibration: schedule_tokens must be >= 0 and batch_size >= 1")

    def describe(self) -> dict:
        settings = asdict(self)
        del settings["batch_size"]  # each row samples from its own generator: batching does not change it
        prompts = settings.pop("prompts")
        settings["prompts"] = len(prompts)
        settings["prompts_sha1"] = hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:16] if prompts else None
        return settings

    def temperature(self, step: int) -> float:
        """Temperature of the step-th generated token (0-based): linear from start to end."""
        if step >= self.schedule_tokens:
            return self.temperature_end
        return self.temperature_start + (self.temperature_end - self.temperature_start) * step / self.schedule_tokens


def read_prompt_file(path: str) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    if not os.path.isfile(path):
        raise DatasetError(f"--self_prompts {path}: no such file (one prompt per line)")
    with open(path, encoding="utf-8") as handle:
        prompts = tuple(line.strip() for line in handle if line.strip())
    if not prompts:
        raise DatasetError(f"--self_prompts {path}: no prompts in it (one prompt per line)")
    return prompts


def prefixes(tokenizer, count: int, options: SelfCalibrationOptions) -> tuple[list[list[int]], str]:
    """The token ids each of `count` sequences starts from, and how they were made."""
    if tokenizer is None:
        raise DatasetError("--dataset self needs the model's tokenizer (to start from BOS or the chat template): "
                           "use --dataset random for a model without one")
    if has_chat_template(tokenizer):
        turns = options.prompts or ("",)
        starts = []
        for text in sorted(set(turns), key=turns.index):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            starts.append(list(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
        by_text = dict(zip(sorted(set(turns), key=turns.index), starts))
        return [by_text[turns[i % len(turns)]] for i in range(count)], \
            "chat template: " + ("prompts" if options.prompts else "an empty user turn") + ", then the assistant"
    if options.prompts:
        ids = [list(tokenizer(p)["input_ids"]) for p in options.prompts]
        return [ids[i % len(ids)] for i in range(count)], "prompts (the tokenizer has no chat template)"
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DatasetError("--dataset self starts from the BOS token, which this tokenizer does not have: "
                           "give --self_prompts FILE")
    return [[start]] * count, "BOS token"


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs with everything outside the smallest set of tokens holding top_p of the mass zeroed
    (the most likely token is always kept)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


@torch.no_grad()
def generate_sequences(model: nn.Module, starts: list[list[int]], seq_len: int, options: SelfCalibrationOptions,
                       seed: int, device: torch.device | str, progress: bool = True, first_row: int = 0) -> torch.Tensor:
    """len(starts) x seq_len token ids: each start, then tokens sampled after it (see the module
    docstring). A batch is left-padded to its longest start and masked, so rows do not see padding.
    first_row: the row number of starts[0] (each row samples from its (seed, row) generator)."""
    from tqdm import tqdm
    _check_lengths(starts, seq_len)
    keyword = cache_keyword(model)
    rows: list[list[int]] = []
    total = sum(seq_len - len(s) for s in starts)
    with tqdm(total=total, desc="self-calibration: generate", unit="tok", disable=not progress) as bar:
        for first in range(0, len(starts), options.batch_size):
            batch = starts[first:first + options.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.tensor([[0] * (width - len(s)) + s for s in batch], device=device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            generators = [torch.Generator().manual_seed(_row_seed(seed, first_row + first + row)) for row in range(len(batch))]
            generated = []
            for step in range(seq_len - min(len(s) for s in batch)):
                logits = out.logits[:, -1].float().cpu()
                probs = _nucleus(torch.softmax(logits / options.temperature(step), dim=-1), options.top_p)
                token = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
                generated.append(token)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
                out = model(input_ids=token.to(device), attention_mask=mask, position_ids=positions,
                            use_cache=True, **{keyword: cache_of(out)})
                bar.update(sum(1 for s in batch if len(s) + step < seq_len))
            new = torch.cat(generated, dim=1).tolist()
            rows += [(s + row)[:seq_len] for s, row in zip(batch, new)]
    return torch.tensor(rows, dtype=torch.long)


def user_turns(model: nn.Module, tokenizer, count: int, max_tokens: int, options: SelfCalibrationOptions,
               seed: int, device: torch.device | str, progress: bool = True) -> list[str]:
    """`count` questions the chat model writes itself: sampled (options' temperature and top_p,
    seeded per row) from its chat template opened at a user turn, cut at the end of the turn or
    after max_tokens. Empty and repeated turns are dropped, so fewer than `count` may return.
    For distillation on prompts no data set holds: the original then answers them."""
    if tokenizer is None or not has_chat_template(tokenizer):
        raise DatasetError("self-written user turns need the tokenizer's chat template: give a prompt file")
    marker = "\u0000USER_TURN\u0000"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    start = list(tokenizer(rendered[:rendered.index(marker)], add_special_tokens=False)["input_ids"])
    end_of_turn = list(tokenizer(rendered[rendered.index(marker) + len(marker):], add_special_tokens=False)["input_ids"])
    stop = end_of_turn[0] if end_of_turn else tokenizer.eos_token_id
    ids = generate_sequences(model, [start] * count, len(start) + max_tokens, options, seed, device, progress)
    turns, seen = [], set()
    for row in ids[:, len(start):].tolist():
        if stop in row:
            row = row[:row.index(stop)]
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        if text and text.lower() not in seen:
            seen.add(text.lower())
            turns.append(text)
    return turns


def _row_seed(seed: int, row: int) -> int:
    """A 32-bit seed of (seed, row): CPU generators keep only 32 bits of what they are given."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{row}".encode()).digest()[:4], "little")


def _check_lengths(starts: list[list[int]], seq_len: int) -> None:
    longest = max(len(s) for s in starts)
    if longest >= seq_len:
        raise DatasetError(f"a self-calibration start (prompt in its chat template) has {longest} tokens, not fewer "
                           f"than --model_seq_len {seq_len}: shorten the prompt or raise --model_seq_len")


def settings_of(model: nn.Module, seq_len: int, seed: int, options: SelfCalibrationOptions, start: str) -> dict:
    """What the generated ids depend on (the count aside: a longer cache serves a shorter request)."""
    return {"method": "self-calibration (Williams et al., arXiv 2410.17170)", "seq_len": seq_len, "seed": seed,
            **options.describe(), "start": start,
            "weights": weights_fingerprint(model, every_parameter=True)}


def cached_sequences(directory: str, settings: dict, nsamples: int) -> torch.Tensor | None:
    """The first nsamples cached sequences when the cache in `directory` was made with `settings`
    and holds enough of them, else None."""
    rows = cached_rows(directory, settings)
    return rows[:nsamples] if rows is not None and rows.shape[0] >= nsamples else None


def cached_rows(directory: str, settings: dict) -> torch.Tensor | None:
    """Every cached sequence when the cache in `directory` was made with `settings`, else None."""
    from safetensors.torch import load_file
    tensors, meta = os.path.join(directory, CACHE_FILE), os.path.join(directory, SETTINGS_FILE)
    if not (os.path.isfile(tensors) and os.path.isfile(meta)):
        return None
    with open(meta, encoding="utf-8") as handle:
        saved = json.load(handle)
    if {k: v for k, v in saved.items() if k != "nsamples"} != settings:
        return None
    return load_file(tensors)["input_ids"]


def save_sequences(directory: str, ids: torch.Tensor, settings: dict) -> None:
    """The cache: ids as safetensors, then the settings (a cache without them is never read)."""
    from safetensors.torch import save_file
    from utils.io import atomic_path, write_json
    with atomic_path(os.path.join(directory, CACHE_FILE)) as temporary:
        save_file({"input_ids": ids.contiguous()}, temporary)
    write_json(os.path.join(directory, SETTINGS_FILE), {**settings, "nsamples": int(ids.shape[0])})


def self_calibration_data(model: nn.Module, tokenizer, nsamples: int, seq_len: int, seed: int,
                          options: SelfCalibrationOptions, device: torch.device | str,
                          cache_dir: str | None = None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """(nsamples x seq_len ids the model wrote, what they are): read from cache_dir when it holds
    them for these settings and this model, else generated (and cached when cache_dir exists); a
    cache of fewer rows keeps them and only the rows after them are generated.
    `model` must be the original (uncompressed) model."""
    options.check()
    starts, start = prefixes(tokenizer, nsamples, options)
    _check_lengths(starts, seq_len)
    settings = settings_of(model, seq_len, seed, options, start)
    info = {"dataset": "self", "kind": "self", "settings": settings}
    cached = cached_rows(cache_dir, settings) if cache_dir else None
    if cached is not None and cached.shape[0] >= nsamples:
        return cached[:nsamples], {**info, "cached": True}
    known = 0 if cached is None else int(cached.shape[0])
    tokens = sum(seq_len - len(s) for s in starts[known:])
    print(f"self-calibration: the model writes {nsamples - known} sequences of {seq_len} tokens ({tokens:,} tokens to "
          f"generate, batches of {options.batch_size}, KV cache; start: {start})"
          + (f", after the {known} cached" if known else ""))
    from utils.model import copies_to
    was_training = model.training
    model.eval()
    restore = copies_to(model, device)  # the whole model on the device while it writes (steps 1-3 keep it on the CPU)
    try:
        ids = generate_sequences(model, starts[known:], seq_len, options, seed, device, progress, first_row=known)
    finally:
        restore()
        model.train(was_training)
    if known:
        ids = torch.cat([cached, ids])
    if cache_dir and os.path.isdir(cache_dir):
        save_sequences(cache_dir, ids, settings)
    return ids, {**info, "cached": False, **({"rows_from_cache": known} if known else {})}
