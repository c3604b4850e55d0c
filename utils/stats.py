"""Input statistics of linear layers, accumulated from the inputs utils.capture.recording_inputs
hands over (GPTQ's add_batch pattern).

For every distinct input of a decoder layer's linears (q/k/v share one, gate/up share one):
    gram      H = X^T X over all calibration tokens (in x in), float64
    tokens    number of tokens seen
    abs_sum   sum over tokens of |x| per channel (abs_mean = abs_sum / tokens), float64
    abs_max   max over tokens of |x| per channel, float32

Precision: each batch's Gram is computed with float32 accumulation (on CUDA straight from
fp16/bf16 activations with torch.mm(..., out_dtype=float32), elsewhere after a cast to float32)
and added into a float64 running sum, so the running sum's round-off does not grow with the
number of tokens; the per-batch product has float32's relative error (about 1e-6). Saved Grams
are float32 and only their upper triangle is stored (`{stream}.gram_upper`, see
InputStatistics.tensors); `saved_gram` rebuilds the matrix and also reads the full layout
(`{stream}.gram`) that earlier versions wrote.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from utils.gram import add_symmetric_gram, symmetric_gram
from utils.capture import recording_inputs


def _row_offset(row: int, n: int) -> int:
    """Where row `row` of an n x n upper triangle starts in its packed form."""
    return row * n - row * (row - 1) // 2


# Two ways to move the triangle, both without n x n temporaries beyond the result: on the CPU
# one slice copy per row (masked_select / masked_scatter run element by element there: 11008
# wide, 2 threads, pack 3.0 s against 0.17 s, unpack 1.6 s against 0.5-0.7 s); on an accelerator
# one masked kernel per block of rows (per-row copies would be 11008 kernel launches, and one
# masked kernel over the whole matrix builds a 1 GB index for 11008 wide).
def _by_rows(tensor: torch.Tensor, method: str | None) -> bool:
    if method not in (None, "rows", "masked"):
        raise ValueError(f"method must be rows or masked, got {method!r}")
    return method == "rows" if method else tensor.device.type == "cpu"


def pack_upper(matrix: torch.Tensor, block: int = 256, method: str | None = None) -> torch.Tensor:
    """The upper triangle of a square matrix, diagonal included, row by row: n (n + 1) / 2 values.
    `method`: "rows" or "masked" (default: rows on the CPU, masked elsewhere)."""
    n = matrix.shape[0]
    packed = torch.empty(n * (n + 1) // 2, dtype=matrix.dtype, device=matrix.device)
    if _by_rows(matrix, method):
        for row in range(n):
            packed[_row_offset(row, n):_row_offset(row + 1, n)] = matrix[row, row:]
        return packed
    for start in range(0, n, block):
        stop = min(start + block, n)
        mask = torch.ones(stop - start, n, dtype=torch.bool, device=matrix.device).triu(start)
        packed[_row_offset(start, n):_row_offset(stop, n)] = torch.masked_select(matrix[start:stop], mask)
    return packed


def unpack_upper(packed: torch.Tensor, n: int, block: int = 256, method: str | None = None,
                 dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric n x n matrix whose upper triangle `packed` holds (inverse of pack_upper),
    on packed's device: move the packed triangle, not the full matrix, to the device first.
    dtype: the matrix's (default packed's), converted a block at a time, so that a float64 Gram
    from a float32 triangle never has a float32 n x n copy beside it. out: an n x n tensor
    (any layout) to fill instead of a new one."""
    if packed.numel() != n * (n + 1) // 2:
        raise ValueError(f"a packed {n} x {n} triangle has {n * (n + 1) // 2} values, got {packed.numel()}")
    if out is None:
        out = torch.empty(n, n, dtype=dtype or packed.dtype, device=packed.device)
    if _by_rows(packed, method):
        for row in range(n):
            out[row, row:] = packed[_row_offset(row, n):_row_offset(row + 1, n)]
    else:
        for start in range(0, n, block):
            stop = min(start + block, n)
            mask = torch.ones(stop - start, n, dtype=torch.bool, device=packed.device).triu(start)
            out[start:stop].masked_scatter_(mask, packed[_row_offset(start, n):_row_offset(stop, n)].to(out.dtype))
    for start in range(0, n, block):  # mirror one block column at a time (cache-friendly transposes)
        stop = min(start + block, n)
        out[stop:, start:stop] = out[start:stop, stop:].T
        diagonal = out[start:stop, start:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
    return out


@dataclass
class PackedGram:
    """A Gram held as its packed upper triangle (n (n + 1) / 2 values), unpacked into a buffer
    only when used: the whitening factor of a wide stream then needs its buffer alone, not the
    full Gram beside it."""

    packed: torch.Tensor
    n: int

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        """The full Gram written into `out` (n x n, any dtype and layout)."""
        return unpack_upper(self.packed, self.n, out=out)

    def full(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full Gram as a new n x n tensor (default: the triangle's dtype)."""
        return unpack_upper(self.packed, self.n, dtype=dtype)


def packed_gram(stats: dict[str, torch.Tensor], stream: str, device: torch.device | str | None = None
                ) -> "PackedGram | None":
    """`stream`'s Gram as a PackedGram on `device`, None when the statistics hold it in full."""
    if f"{stream}.gram_upper" not in stats:
        return None
    packed = stats[f"{stream}.gram_upper"]
    return PackedGram(packed if device is None else packed.to(device), stats[f"{stream}.abs_sum"].numel())


def saved_gram(stats: dict[str, torch.Tensor], stream: str,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The Gram matrix of `stream` from one layer's saved statistics (either layout), on `device`
    (default: where the statistics are), in `dtype` (default as stored, float32)."""
    packed = packed_gram(stats, stream, device)
    if packed is not None:
        return packed.full(dtype)
    if f"{stream}.gram" in stats:
        gram = stats[f"{stream}.gram"]
        return gram.to(device=device or gram.device, dtype=dtype or gram.dtype)
    raise KeyError(f"no Gram matrix for {stream!r} in these statistics (keys: {sorted(stats)[:6]}...)")


def batch_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x for x (tokens x in), accumulated in float32."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(x.T, x, out_dtype=torch.float32)
    return symmetric_gram(x.float())


def add_batch_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += batch_gram(x), bit for bit; on the CPU without its n x n float32 product (summed into
    `gram` a block row at a time: host memory is where the float64 Grams already are)."""
    if x.is_cuda:
        gram += batch_gram(x)
    else:
        add_symmetric_gram(gram, x.float())


class InputStatistics:
    """Running statistics of one input stream."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.abs_max = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        add_batch_gram(self.gram, x)
        absx = x.abs().float()
        self.abs_sum += absx.sum(0)
        torch.maximum(self.abs_max, absx.amax(0), out=self.abs_max)
        self.tokens += x.shape[0]

    def tensors(self, prefix: str, gram_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The statistics for saving. The Gram is stored in float32 by default: rounding the
        float64 sum to float32 (relative error 6e-8 per entry) adds far less than the float32
        per-batch products already carry (about 1e-6), and halves the statistics on disk. Only
        its upper triangle is kept (it is symmetric), which halves them again: a LLaMA-7B layer
        takes 0.35 GB instead of 1.4 GB in full float64. Read them back with `saved_gram`."""
        return {f"{prefix}.gram_upper": pack_upper(self.gram.to(gram_dtype)).cpu(),
                f"{prefix}.abs_sum": self.abs_sum.cpu(),
                f"{prefix}.abs_max": self.abs_max.cpu(),
                f"{prefix}.tokens": torch.tensor([self.tokens], dtype=torch.int64)}


class LayerStatsCollector:
    """Within its block, records the inputs of every given linear of one decoder layer
    (utils.capture.recording_inputs); linears fed the same tensor share one stream.

    Sharing is detected from the forward pass itself (the same input tensor object reaching
    several linears in one call), so no family-specific grouping table is needed. stop_layer: the
    layer holding the linears, whose calls end once every linear was called (recording_inputs).
    """

    def __init__(self, linears: dict[str, nn.Module], device: torch.device | str,
                 stop_layer: nn.Module | None = None):
        self.linears = linears
        self.device = device
        self.stop_layer = stop_layer
        self.streams: dict[str, InputStatistics] = {}
        self.stream_of: dict[str, str] = {}  # module name -> stream name
        # stream -> its latest input tensor; holding the reference keeps it alive, so an identity
        # test cannot be fooled by a freed tensor's memory being reused for a new one
        self._last_input: dict[str, torch.Tensor] = {}
        self._recording = ExitStack()

    def __enter__(self) -> "LayerStatsCollector":
        self._recording.enter_context(recording_inputs(self.linears, self.add, self.stop_layer))
        return self

    def __exit__(self, *exc) -> None:
        self._recording.close()
        self._last_input.clear()

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add linear `name`'s input x to its stream's statistics."""
        stream = self.stream_of.get(name)
        if stream is None:
            # first batch: join a stream whose latest input is this very tensor, else open one
            stream = next((s for s, t in self._last_input.items() if t is x), name)
            self.stream_of[name] = stream
        if stream == name:
            if stream not in self.streams:
                self.streams[stream] = InputStatistics(x.shape[-1], self.device)
            self.streams[stream].add_batch(x)
        self._last_input[stream] = x

    def tensors(self, gram_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for stream, stats in self.streams.items():
            out.update(stats.tensors(stream, gram_dtype))
        return out

