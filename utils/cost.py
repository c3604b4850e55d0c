"""What a long pass will cost, said before it starts: its counts times one timed unit.

The driver (compress.py) knows the counts of a pass (windows, matrices, candidates, epochs) and
times one unit of it on the device it will run on (one decoder layer and the head on one window,
window_seconds); estimate() multiplies them and says which cheaper settings exist. The estimate
and the pass's actual time go into the record it writes, so the two can be compared.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class CostEstimate:
    what: str  # "sensitivity pass (kl)"
    counts: dict[str, int]  # multiplied: {"matrices": 210, "candidates": 10, "windows": 16}
    unit: str  # what unit_s is the time of: "one window through the model"
    unit_s: float  # timed, before the pass
    factor: float = 1.0  # a fixed multiplier: the mean share of the layers re-run, backward ~ 2 forwards
    cheaper: list[tuple[str, float]] = field(default_factory=list)  # (flags, fraction of the cost they leave)

    @property
    def seconds(self) -> float:
        return math.prod(self.counts.values()) * self.unit_s * self.factor

    def message(self) -> str:
        counts = " x ".join(f"{value:,} {name}" for name, value in self.counts.items())
        factor = f" x {self.factor:.3g}" if self.factor != 1.0 else ""
        text = (f"{self.what}: about {format_duration(self.seconds)} = {counts}{factor} x {self.unit_s:.3g} s "
                f"({self.unit}, timed now)")
        if self.cheaper:
            text += "; cheaper: " + ", ".join(f"{flags} (about {format_duration(self.seconds * fraction)})"
                                              for flags, fraction in self.cheaper)
        return text

    def record(self, actual_s: float | None = None) -> dict:
        return {"what": self.what, "counts": dict(self.counts), "unit": self.unit, "unit_s": round(self.unit_s, 6),
                "factor": round(self.factor, 6), "estimated_s": round(self.seconds, 3),
                "actual_s": None if actual_s is None else round(actual_s, 3)}


def estimate(what: str, counts: dict[str, int], unit: str, unit_s: float, factor: float = 1.0,
             cheaper: list[tuple[str, float]] | None = None) -> CostEstimate:
    """counts x timed unit (x factor) -> a CostEstimate; only the cheaper settings that are cheaper
    are kept."""
    kept = [(flags, fraction) for flags, fraction in (cheaper or []) if 0.0 < fraction < 1.0]
    return CostEstimate(what, dict(counts), unit, unit_s, factor, kept)


@torch.no_grad()
def window_seconds(model: nn.Module, seq_len: int, device: torch.device | str, seed: int = 0) -> dict:
    """The timed unit: seconds of one decoder layer and of the head on one window of `seq_len`
    random tokens on `device` (layer 0 and the head moved there and back, as the passes do), and
    their sum over the model: {"layer_s", "head_s", "window_s", "layers"}."""
    from utils.layerwise import capture_layer_inputs, layer_on_device, run_layer
    from utils.model import decoder_layers, head_on_hidden, layer_stream
    layers = decoder_layers(model)
    vocab = model.config.vocab_size
    window = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    hidden, layer_args = capture_layer_inputs(model, window, device)
    stream = layer_stream(model)  # layers streamed from disk: layer 0 is read for the timing, then released
    if stream is not None:
        stream.load(model, 0)
    try:
        home = next(layers[0].parameters()).device
        with layer_on_device(layers[0], device, offload=home) as layer:  # the one way a layer comes to the device
            run_layer(layer, hidden, layer_args[0])  # warm-up (kernels, allocator)
            start = _now(device)
            out = run_layer(layer, hidden, layer_args[0])
            layer_s = _now(device) - start
    finally:
        if stream is not None:
            stream.release(model, 0)
    with head_on_hidden(model, device) as head:  # the model's own final norm, lm_head and soft-capping
        ids = window.to(device)
        start = _now(device)
        head(out, ids)
        head_s = _now(device) - start
    del hidden, out
    return {"layer_s": layer_s, "head_s": head_s, "window_s": len(layers) * layer_s + head_s, "layers": len(layers)}


def _now(device) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()
