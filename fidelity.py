"""Chat fidelity: does a compressed model still answer as its original does?

Perplexity on text says little about a chat model's answers (a model can keep a fair perplexity
and answer nothing), so the compressed model is scored against its original's own answers:

  * reference: the original's greedy response to every held-out prompt (chat template, at most
    max_new_tokens new tokens, its end-of-turn token included when it stopped on one), made once
    and cached on disk under a key of the original's weights, the prompt token ids and the settings;
  * agreement: the original's response tokens are fed to the compressed model (teacher forcing)
    and we count the response positions where its argmax is the original's token;
  * response perplexity: exp(mean NLL of those tokens under the compressed model);
  * empty share: the share of prompts the compressed model answers with nothing: its own greedy
    response starts with an end token, or decodes to whitespace only;
  * free generation: the share of prompts whose greedy response equals the original's, and the
    mean length of the common token prefix over the original's response length.
"""
from __future__ import annotations

import hashlib
import math
import os

import torch
from torch import nn

from utils.io import read_json, write_json
from utils.prompts import end_tokens, prompt_ids
from utils.model import weights_fingerprint

CACHE_FORMAT = "svd-compress-chat-reference"
BATCH_SIZE = 16  # prompts generated together


def default_cache_dir() -> str:
    """$SVD_COMPRESS_CACHE/chat_references, else ~/.cache/svd-compress/chat_references: one file per
    (original weights, prompts, settings), shared by every compressed model of that original."""
    root = os.environ.get("SVD_COMPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "svd-compress")
    return os.path.join(root, "chat_references")


def response_is_empty(ids: list[int], text: str, ends: list[int]) -> bool:
    """No answer: no token, an end token first, or only whitespace once decoded."""
    return not ids or ids[0] in ends or not text.strip()


@torch.no_grad()
def greedy_responses(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                     chat_template: bool = True, device: str | torch.device = "cpu",
                     batch_size: int = BATCH_SIZE) -> list[dict]:
    """Greedy response of `model` to each prompt: token ids (cut after the first end token, which
    is kept), text, why it stopped, emptiness. Prompts go batch_size at a time, left-padded (one
    prompt at a time spends most of a small model's decoding in per-step overhead on a CPU)."""
    from transformers import GenerationConfig
    ends = end_tokens(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (ends[0] if ends else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, top_k=None,
                              temperature=None, top_p=None, eos_token_id=ends or None, pad_token_id=pad)
    responses = []
    for start in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tokenizer, p, chat_template)[0][0].tolist() for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            stop = next((i for i, token in enumerate(row) if token in ends), None)
            new = row if stop is None else row[:stop + 1]
            text = tokenizer.decode(new, skip_special_tokens=True)
            responses.append({"ids": new, "text": text, "stopped": "max_new_tokens" if stop is None else "eos",
                              "empty": response_is_empty(new, text, ends)})
    return responses


def reference_responses(original: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                        chat_template: bool = True, device: str | torch.device = "cpu",
                        cache_dir: str | None = None, batch_size: int = BATCH_SIZE) -> tuple[list[dict], dict]:
    """The original's greedy responses, from the cache when it holds them for exactly these weights,
    prompt ids and settings; returns (responses, {"key", "path", "from_cache"}). cache_dir None:
    default_cache_dir()."""
    prompt_token_ids = [prompt_ids(tokenizer, p, chat_template)[0][0].tolist() for p in prompts]
    settings = {"max_new_tokens": max_new_tokens, "chat_template": chat_template, "decoding": "greedy",
                "end_tokens": end_tokens(original, tokenizer), "batch_size": batch_size}
    fingerprint = weights_fingerprint(original, every_parameter=True)  # the whole model wrote them
    key_source = repr((fingerprint, prompt_token_ids, sorted(settings.items())))
    key = hashlib.sha256(key_source.encode()).hexdigest()[:24]
    path = os.path.join(cache_dir or default_cache_dir(), f"{key}.json")
    if os.path.isfile(path):
        try:
            cached = read_json(path)
            if cached.get("format") == CACHE_FORMAT and cached.get("key") == key:
                return cached["responses"], {"key": key, "path": path, "from_cache": True}
        except (ValueError, KeyError):
            pass  # unreadable: made again and replaced
    responses = greedy_responses(original, tokenizer, prompts, max_new_tokens, chat_template, device, batch_size)
    write_json(path, {"format": CACHE_FORMAT, "key": key, "settings": settings, "prompts": prompts,
                      "responses": responses})
    return responses, {"key": key, "path": path, "from_cache": False}


@torch.no_grad()
def teacher_forced(model: nn.Module, prompt: list[int], response: list[int],
                   device: str | torch.device = "cpu") -> tuple[int, float]:
    """(positions where the argmax is the response token, summed NLL of the response tokens) of
    `model` fed the prompt and the response."""
    ids = torch.tensor([prompt + response], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].float()
    target = ids[0, len(prompt):].to(logits.device)
    matches = int((logits.argmax(dim=-1) == target).sum())
    return matches, float(nn.functional.cross_entropy(logits, target, reduction="sum"))


def prefix_agreement(responses: list[list[int]], references: list[list[int]]) -> dict:
    """Free-generation agreement: share of responses equal to their reference, and mean over
    prompts of (common token prefix length) / (reference length)."""
    if len(responses) != len(references) or not references:
        raise ValueError("prefix_agreement needs one response per reference, at least one")
    exact, fractions = 0, []
    for got, want in zip(responses, references):
        exact += got == want
        common = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        fractions.append(common / len(want) if want else float(not got))
    return {"exact_match_share": exact / len(references), "prefix_agreement_mean": sum(fractions) / len(fractions)}


def chat_fidelity(model: nn.Module, tokenizer, prompts: list[str], references: list[dict],
                  chat_template: bool = True, device: str | torch.device = "cpu", batch_size: int = BATCH_SIZE) -> dict:
    """Score `model` against the original's `references` (reference_responses) on `prompts`:
    teacher-forced agreement and response perplexity, empty share and free-generation agreement of
    its own greedy responses (as long as the references may be). Per-prompt figures under "per_prompt"."""
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} reference responses")
    model.eval()
    max_new_tokens = max(len(r["ids"]) for r in references)
    own = greedy_responses(model, tokenizer, prompts, max_new_tokens, chat_template, device, batch_size)
    matches = tokens = 0
    nll = 0.0
    per_prompt = []
    for prompt, reference, response in zip(prompts, references, own):
        ids = prompt_ids(tokenizer, prompt, chat_template)[0][0].tolist()
        hit, loss = teacher_forced(model, ids, reference["ids"], device)
        matches, tokens, nll = matches + hit, tokens + len(reference["ids"]), nll + loss
        per_prompt.append({"agreement": hit / len(reference["ids"]), "reference_tokens": len(reference["ids"]),
                           "empty": response["empty"], "response": response["text"]})
    mean_nll = nll / tokens
    return {"prompts": len(prompts), "reference_tokens": tokens,
            "agreement": matches / tokens,
            "agreement_prompt_mean": sum(p["agreement"] for p in per_prompt) / len(per_prompt),
            "response_ppl": math.exp(mean_nll) if mean_nll < 700 else None,  # None: beyond float64 (or NaN)
            "response_mean_nll": mean_nll if math.isfinite(mean_nll) else None,
            "empty_share": sum(r["empty"] for r in own) / len(own),
            "reference_empty_share": sum(r["empty"] for r in references) / len(references),
            **prefix_agreement([r["ids"] for r in own], [r["ids"] for r in references]),
            "per_prompt": per_prompt}
