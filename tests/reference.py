"""Reference computations the tests compare the library against, written out by hand."""
from __future__ import annotations

import math

import torch


def hand_ppl(model, windows: torch.Tensor) -> tuple[float, int]:
    """exp(mean NLL) of tokens 1.. of each window (one window per forward pass), via float64
    log-softmax: token t's NLL is -log p(ids[t] | ids[:t]), read at row t - 1."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            positions = torch.arange(1, window.numel())
            total -= float(logp[positions - 1, window[positions]].sum())
            count += positions.numel()
    return math.exp(total / count), count


def hand_text_ppl(model, tokenizer, text: str, seq_len: int, limit: int | None = None) -> float:
    """hand_ppl of the first `limit` non-overlapping windows of seq_len tokens of `text`."""
    from utils.data import tokenize
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seq_len if limit is None else limit
    assert 0 < n * seq_len <= ids.numel()
    return hand_ppl(model, ids[:n * seq_len].view(n, seq_len))[0]
