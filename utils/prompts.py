"""Prompts of the steps that make a model answer (steps 4 --eval_chat, 9 and 10): read from the
flags and files, turned into token ids in the tokenizer's chat template, and the ids that end a
response. Shared by generate.py, fidelity.py, serve.py and evaluater.py, which import nothing of
each other for it."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from utils.data import DatasetError


def read_prompts(prompts: list[str] | None, prompts_file: str | None, flag: str = "--prompts") -> list[str]:
    """--prompt values, then the prompts of --prompts FILE: .jsonl rows with a "prompt" field,
    otherwise one prompt per non-empty line. DatasetError on an unreadable file or no prompts
    (`flag` names the option the file came from)."""
    found = list(prompts or [])
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise DatasetError(f"{flag} {prompts_file}: no such file (one prompt per line, or .jsonl "
                               f"rows with a \"prompt\" field)")
        with open(prompts_file, encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle]
        if prompts_file.endswith(".jsonl"):
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    found.append(row["prompt"] if isinstance(row, dict) else row)
                except (ValueError, KeyError, TypeError):
                    raise DatasetError(f"{flag} {prompts_file}: line {number} is not a JSON object with a "
                                       f"\"prompt\" field") from None
        else:
            found += [line for line in lines if line.strip()]
    if prompts_file and not found:
        raise DatasetError(f"{flag} {prompts_file}: the file has no prompts (one per line)")
    if not found or not all(isinstance(p, str) and p for p in found):
        raise DatasetError("step 9 needs prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return found


def prompt_ids(tokenizer, prompt: str, chat_template: bool) -> tuple[torch.Tensor, bool]:
    """(1 x n token ids, whether the chat template was applied)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"], True
    return tokenizer(prompt, return_tensors="pt")["input_ids"], False


def end_tokens(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end a response: the model's generation config's, else the tokenizer's EOS."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
