"""End-to-end sensitivity of every target matrix at candidate ranks: one implementation for
Duo-SVD's KL metric and ASVD's calibration-perplexity metric (plus ASVD's spectral stable_rank,
which needs no forward pass).

For each target matrix and each candidate kept fraction p (rank floor(m n p / (m + n)), SVD-LLM's
and both references' convention; p = 1.0 is the original dense matrix), only that matrix is
replaced, every other matrix is in the base state, and the metric is measured on the sensitivity
windows:

  metric "kl"  (Duo-SVD, Pupu792/CPSVD utils/svd_utils.py calib_sensitivity_kl): base state =
               every matrix at the uniform rank of `base_ratio`; value = mean over the windows'
               tokens (every position) of KL(original || perturbed) of the next-token
               distributions. The reference sums KL over a window's tokens and averages over
               windows (KLDivLoss 'batchmean' with one window per batch): ours is that divided by
               the window length, the same ordering and the same DP optimum.
  metric "ppl" (ASVD, hahnyuan/ASVD4LLM sensitivity.py calib_sensitivity_ppl): base state = every
               other matrix dense; value = perplexity of the windows (tokens 1..L-1).

What the reference does and we follow: the base state is set once with the ORIGINAL model's
statistics (step 1's Grams) for every matrix (no re-profiling of the compressed model); a matrix's
candidate truncations all come from one whitened SVD of it; the candidates' truncation is
"(U_r S_r Vh_r) S^-1" of W S. Where we differ (cost only, not results): the reference runs the whole
model for every candidate; here a change to a matrix of layer i re-runs layers i..L-1 and the head
only, from layer i's inputs in the base state.

Memory: decoder layers come to the device one at a time, two while the perturbed streams of a layer
pass through a later one (each later layer comes once per group of perturbations, not once per
perturbation); the base state (the SVD modules) and the kept factors of every matrix up to the
largest candidate rank (kl: about 0.9 of the layers' parameters) stay on `offload` (the host). A
model streamed from disk (utils.model.LayerStream) holds two layers on the host too: each is read
when a walk reaches it (the later ones again for every group) and released after, and the base
state's factors wait in a scratch directory (_BaseStateSpill), not in memory.
Activations: the windows' streams of one layer (original, base state, and as many perturbed streams,
N x L x d each, as `stream_bytes` allows, default 2 GiB), and for the kl metric the original model's
log-probabilities, N x L x vocab, stored only when that is at most `logprob_cache_bytes` (default
512 MiB: SmolLM2, vocab 49152, 4 x 256 tokens: 201 MB, 4 x 512: 403 MB); above that only the
original final hidden states are kept and the original log-probs are recomputed per evaluation (one
more pass of the head).

The table on disk (utils.io.write_json, atomic) is keyed by model, statistics, windows,
candidates, metric, base state and whitening; sensitivity_table reuses it when the key matches
(no forward pass) and refuses it, naming the first differing field, when it does not.

The allocations over a table, --allocation asvd and duo (ASVD, DUO: their options declare the table,
the windows and the statistics step 2's driver gives make_plan), are registered here with the flags.
"""
from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator

import torch
from torch import nn
from tqdm import tqdm

from component import LowRankLinear
from methods.allocation import asvd_plan, asvd_ppl_plan, duo_plan
from methods.method import AllocationOptions, Flag, FlagError, Method, PlanInputs
from utils.decompose import low_rank_factors
from utils.io import read_json, write_json
from utils.layerwise import (LayerContext, capture_layer_inputs, fix_mmap_threshold, layer_on_device, run_layer,
                             walk_layers)
from utils.model import (copies_to, decoder_layers, head_on_hidden, layer_prefix, layer_stream, model_description,
                         set_submodule, target_linears, tensors_digest, weights_fingerprint)
from utils.plan import Plan, rank_for_ratio
from utils.whitening import input_transform

if TYPE_CHECKING:
    from methods.decompose import DecomposeOptions

TABLE_FORMAT = "svd-compress-sensitivity"
METRICS = ("kl", "ppl", "stable_rank")
DUO_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # kept fractions, 1.0 = dense (Duo-SVD)
ASVD_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # ASVD's param_ratio_candidates
LOGPROB_CACHE_BYTES = 512 * 2 ** 20
STREAM_BYTES = 2 * 2 ** 30  # perturbed streams (N x L x d each) carried through the later layers at once


class SensitivityError(ValueError):
    """A table that cannot be used (key mismatch, non-finite value): the message says which and why."""


@dataclass
class SensitivityOptions:
    metric: str = "kl"  # kl (Duo-SVD) | ppl (ASVD) | stable_rank (ASVD, no forward pass)
    ratios: tuple[float, ...] = DUO_RATIOS  # candidate KEPT fractions in (0, 1]; 1.0 = dense
    base_ratio: float | None = None  # removed fraction of every other matrix; None: others dense
    whitening: str = "cholesky"
    scaling: str = "none"  # ASVD's activation-aware scaling (with whitening none): utils.whitening.input_transform
    alpha: float = 0.5
    svd_dtype: torch.dtype = torch.float32
    svd_driver: str = "auto"  # utils.decompose.exact_svd's: checked gesvda on CUDA
    logprob_cache_bytes: int = LOGPROB_CACHE_BYTES

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown sensitivity metric {self.metric!r}; choose one of {METRICS}")
        ratios = tuple(sorted({float(r) for r in self.ratios}))
        if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"sensitivity ratios are kept fractions in (0, 1], got {self.ratios}")
        if self.base_ratio is not None and not 0.0 < self.base_ratio < 1.0:
            raise ValueError(f"base_ratio must be in (0, 1), got {self.base_ratio}")
        if self.base_ratio is not None:  # the base state is a candidate too (the reference adds it)
            ratios = tuple(sorted(set(ratios) | {round(1.0 - self.base_ratio, 10)}))
        self.ratios = ratios

    def base_state(self) -> str:
        return "dense" if self.base_ratio is None else f"uniform ratio {self.base_ratio:g}"


@dataclass
class SensitivityTable:
    """values[name][p] = the metric with only `name` at kept fraction p (base state elsewhere)."""

    key: dict
    values: dict[str, dict[float, float]]
    base_value: float | None = None  # the metric of the base state itself (ppl: original model)
    ranks: dict[str, dict[float, int | None]] = field(default_factory=dict)  # the rank each p meant
    sigmas: dict[str, list[float]] | None = None  # whitened singular values (kl/ppl), for budget fills
    seconds: float = 0.0
    evaluations: int = 0

    @property
    def metric(self) -> str:
        return self.key["metric"]

    def check_finite(self) -> None:
        for name, row in self.values.items():
            for p, value in row.items():
                if not (isinstance(value, (int, float)) and math.isfinite(value)):
                    raise SensitivityError(f"sensitivity of {name} at kept fraction {p:g} is {value}: not finite "
                                           f"(the model diverges with it); rerun with more --sensitivity_nsamples, "
                                           f"--dtype float32, or drop that candidate from --sensitivity_ratios")

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, "key": self.key, "base_value": self.base_value,
                "seconds": round(self.seconds, 3), "evaluations": self.evaluations,
                "values": {n: {f"{p:g}": v for p, v in row.items()} for n, row in self.values.items()},
                "ranks": {n: {f"{p:g}": r for p, r in row.items()} for n, row in self.ranks.items()},
                "sigmas": self.sigmas}

    @classmethod
    def from_dict(cls, data: dict) -> "SensitivityTable":
        def floats(row: dict) -> dict:
            return {float(p): v for p, v in row.items()}
        table = cls(data["key"], {n: floats(r) for n, r in data["values"].items()}, data.get("base_value"),
                    {n: floats(r) for n, r in (data.get("ranks") or {}).items()}, data.get("sigmas"),
                    data.get("seconds", 0.0), data.get("evaluations", 0))
        return table

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())


# ---------------------------------------------------------------------------------------- the key

def statistics_key(stats) -> dict | None:
    """What identifies step 1's statistics: their meta (dataset, windows, seed, tokens) and a hash
    of layer 0's tensors (any re-profiling changes it)."""
    if stats is None:
        return None
    meta = {k: stats.meta.get(k) for k in ("model", "dataset", "nsamples", "seq_len", "seed", "tokens")}
    tensors, _ = stats.layer(0)
    return {**meta, "layer0_sha1": tensors_digest(tensors)}


def table_key(model: nn.Module, stats, windows: torch.Tensor | None, options: SensitivityOptions,
              windows_info: dict | None = None) -> dict:
    """model (description and a hash of its first and last decoder layers' weights), statistics,
    windows (what they are and a hash of their ids), candidates, metric, base state, whitening."""
    description = {**model_description(model), "weights_sha1": weights_fingerprint(model)["sha1"]}  # first and last layer
    win = None
    if windows is not None and options.metric != "stable_rank":
        win = {**(windows_info or {}), "nsamples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
               "ids_sha1": tensors_digest({"ids": windows.to(torch.int64)})}
    return {"model": description, "statistics": statistics_key(stats) if options.metric != "stable_rank" else None,
            "windows": win, "candidates": [float(r) for r in options.ratios], "metric": options.metric,
            "base_state": options.base_state(),
            "whitening": options.whitening if options.metric != "stable_rank" else None,
            "scaling": None if options.metric == "stable_rank" or options.scaling == "none"
            else {"method": options.scaling, "alpha": options.alpha}}


def first_difference(expected, found, path: str = "") -> str | None:
    """The dotted path of the first field where two keys differ (None: equal)."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for k in list(expected) + [k for k in found if k not in expected]:
            if k not in expected or k not in found:
                return f"{path}{k}"
            diff = first_difference(expected[k], found[k], f"{path}{k}.")
            if diff is not None:
                return diff
        return None
    if isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
        for e, f in zip(expected, found):
            if first_difference(e, f, path) is not None:
                return path.rstrip(".")
        return None
    return None if expected == found else path.rstrip(".")


def load_table(path: str, key: dict) -> SensitivityTable:
    """The table at `path` if its key is `key`; SensitivityError naming the differing field if not."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:
        raise SensitivityError(f"sensitivity table {path}: cannot be read ({error}); remove it or pass --overwrite")
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise SensitivityError(f"{path}: not a sensitivity table of this tool; choose another --sensitivity_path")
    diff = first_difference(key, data.get("key", {}))
    if diff is not None:
        def at(d, dotted):
            for part in dotted.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d
        raise SensitivityError(f"sensitivity table {path} was measured with a different {diff} "
                               f"({at(data.get('key', {}), diff)!r}, now {at(key, diff)!r}): pass --overwrite to "
                               f"measure it again, or another --sensitivity_path")
    table = SensitivityTable.from_dict(data)
    table.check_finite()
    return table


# ---------------------------------------------------------------------------------------- input transform

def input_factor(stats_tensors: dict | None, stream: str, device, options: SensitivityOptions,
                 fisher: torch.Tensor | None = None):
    """The right factor S of W S whose truncation is taken, as step 3 takes it
    (utils.whitening.input_transform: whitening, ASVD's scaling, or None for plain SVD)."""
    if options.whitening == "none" and options.scaling == "none":
        return None
    return input_transform(stats_tensors, stream, device, options.whitening, options.scaling, options.alpha, fisher)


class _MatrixSVD:
    """One whitened SVD of W (utils.decompose.low_rank_factors with Sigma on u), truncated on demand:
    rank r -> u (m x r) = U_r S_r, v = Vh_r S^-1; sigma: the whole spectrum."""

    def __init__(self, weight: torch.Tensor, factor, max_rank: int, svd_dtype: torch.dtype, svd_driver: str,
                 keep_on: torch.device | str):
        factors = low_rank_factors(weight, max(1, min(max_rank, *weight.shape)), factor, "svd", svd_dtype,
                                   svd_driver=svd_driver, sigma_fuse="U")
        self.sigma = factors.spectrum
        self.u = factors.u.to(torch.float32).to(keep_on)
        self.v = factors.v.to(torch.float32).to(keep_on)

    @classmethod
    def of_factors(cls, u: torch.Tensor, v: torch.Tensor) -> "_MatrixSVD":
        """The SVD whose kept factors u, v were taken before (read back from a _BaseStateSpill)."""
        svd = cls.__new__(cls)
        svd.sigma, svd.u, svd.v = None, u, v
        return svd

    def module(self, rank: int, bias: torch.Tensor | None, dtype: torch.dtype, device) -> LowRankLinear:
        return LowRankLinear.from_factors(self.u[:, :rank].to(device), self.v[:rank].to(device), bias, dtype, device)


class _BaseStateSpill:
    """A base state (duo: every matrix at the uniform rank) of a model streamed from disk: each layer's
    kept SVD factors, which the whole-model path keeps on `offload` for the measuring walk, written to
    a scratch directory once the base-state walk has taken them and read back when a later walk
    reaches the layer (the layer's own weights come from the checkpoint). Host memory then holds
    about two layers whatever the depth; the factors of every layer are on disk meanwhile (float32,
    up to the largest candidate rank, and the base rank's apart)."""

    def __init__(self, directory: str, dtype: torch.dtype):
        self.directory, self.dtype = directory, dtype
        self.matrices: dict[int, list[tuple[str, str, int]]] = {}  # layer -> (local name, qualified name, base rank)

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"layer_{index}.safetensors")

    def save(self, index: int, svds: dict[str, _MatrixSVD], matrices: list[tuple[str, str, int]]) -> None:
        """Layer `index`'s factors (qualified name -> SVD), and its base rank's factors apart (what a
        later layer needs, read without the rest)."""
        from safetensors.torch import save_file
        tensors = {}
        for _, full, rank in matrices:
            svd = svds[full]
            tensors.update({f"{full}.u": svd.u.contiguous(), f"{full}.v": svd.v.contiguous(),
                            f"{full}.base_u": svd.u[:, :rank].contiguous(), f"{full}.base_v": svd.v[:rank].contiguous()})
        save_file({k: t.cpu() for k, t in tensors.items()}, self._path(index))
        self.matrices[index] = matrices

    def svds(self, index: int) -> dict[str, _MatrixSVD]:
        """Layer `index`'s SVDs as save had them."""
        from safetensors import safe_open
        with safe_open(self._path(index), framework="pt") as handle:
            return {full: _MatrixSVD.of_factors(handle.get_tensor(f"{full}.u"), handle.get_tensor(f"{full}.v"))
                    for _, full, _ in self.matrices[index]}

    def load(self, layer: nn.Module, index: int) -> Callable[[], None]:
        """Put decoder layer `index`, `layer` (its weights read), in the base state, on the CPU; returns
        what puts its original modules back (before the layer is released)."""
        from safetensors import safe_open
        originals = {}
        with safe_open(self._path(index), framework="pt") as handle:
            for name, full, _ in self.matrices[index]:
                original = originals[name] = layer.get_submodule(name)
                bias = original.bias.detach() if original.bias is not None else None
                set_submodule(layer, name, LowRankLinear.from_factors(
                    handle.get_tensor(f"{full}.base_u"), handle.get_tensor(f"{full}.base_v"), bias, self.dtype, "cpu"))

        def undo() -> None:
            for name, original in originals.items():
                set_submodule(layer, name, original)
        return undo


# ---------------------------------------------------------------------------------------- head

def _kl_mean(original_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum over tokens of KL(p || q), float64 scalar, p from log-probs (L x V), q from logits."""
    q = torch.log_softmax(logits.float(), dim=-1)
    return (original_logprobs.exp() * (original_logprobs - q)).sum(dtype=torch.float64)


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:-1].float(), ids[1:].to(logits.device), reduction="sum").double()


# ---------------------------------------------------------------------------------------- measurement

def candidate_rank(m: int, n: int, kept: float) -> int | None:
    """Rank of kept fraction p (None: dense, for p = 1 or when the rank would not shrink it)."""
    return None if kept >= 1.0 else rank_for_ratio(m, n, 1.0 - kept)


def stable_rank_table(model: nn.Module, options: SensitivityOptions, key: dict) -> SensitivityTable:
    """ASVD's calib_sensitivity_stable_rank: value(p) = -sr * p^0.1 with sr = ||W||_F / ||W||_2 of the
    raw weight (as ASVD, which leaves the scaling commented out). Spectral norms only, no forward pass."""
    start = time.perf_counter()
    values, ranks = {}, {}
    stream, prefix = layer_stream(model), layer_prefix(model)
    for index, layer in enumerate(decoder_layers(model)):
        if stream is not None:  # a streamed layer is read for its norms and released
            stream.load(model, index)
        try:
            for name, linear in target_linears(layer).items():
                full = f"{prefix}.{index}.{name}"
                w = linear.weight.detach().float()
                sr = float(torch.linalg.matrix_norm(w, "fro") / torch.linalg.matrix_norm(w, 2))
                values[full] = {p: -sr * p ** 0.1 for p in options.ratios}
                ranks[full] = {p: candidate_rank(linear.out_features, linear.in_features, p) for p in options.ratios}
        finally:
            if stream is not None:
                stream.release(model, index)
    table = SensitivityTable(key, values, None, ranks, None, time.perf_counter() - start, 0)
    table.check_finite()
    return table


@torch.no_grad()
def measure_sensitivity(model: nn.Module, windows: torch.Tensor, stats, device: torch.device | str,
                        options: SensitivityOptions, key: dict | None = None, progress: bool = True,
                        offload: torch.device | str = "cpu", stream_bytes: int = STREAM_BYTES,
                        spill_dir: str | None = None) -> SensitivityTable:
    """Measure the table (metric kl or ppl) on `windows` (N x L token ids). The model is left as it
    was (original modules and weights back in place, on `offload`, also on an error).

    Decoder layers come to the device one at a time (two while a perturbed layer's streams pass
    through a later one): a first walk sets the base state (kept on `offload`) and gets the final
    hidden states of both streams; a second walk takes each layer in turn, makes its perturbed
    streams (one per candidate of each of its matrices, N x L x d each, as many at once as fit in
    `stream_bytes`) and brings every later layer to the device once per such group to carry them.

    A model streamed from disk (utils.model.LayerStream) has each layer read when a walk reaches it and
    released after: a later layer is read again for every group that passes through it (about L^2 / 2
    reads per group size); a base state's factors go to a _BaseStateSpill in a scratch directory
    (`spill_dir`, default the system's temporary one) instead of staying in memory. The same table."""
    if options.metric == "stable_rank":
        return stable_rank_table(model, options, key or table_key(model, stats, None, options))
    if (options.whitening != "none" or options.scaling != "none") and stats is None:
        raise ValueError(f"whitening {options.whitening!r} / scaling {options.scaling!r} need the statistics of step 1")
    key = key or table_key(model, stats, windows, options)
    if layer_stream(model) is not None and options.base_ratio is not None:
        if spill_dir is not None:
            os.makedirs(spill_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sensitivity-base-state-", dir=spill_dir) as directory:
            return _measure(model, windows, stats, device, options, key, progress, offload, stream_bytes,
                            _BaseStateSpill(directory, next(model.parameters()).dtype))
    return _measure(model, windows, stats, device, options, key, progress, offload, stream_bytes, None)


def _measure(model: nn.Module, windows: torch.Tensor, stats, device: torch.device | str, options: SensitivityOptions,
             key: dict, progress: bool, offload: torch.device | str, stream_bytes: int,
             spill: _BaseStateSpill | None) -> SensitivityTable:
    """measure_sensitivity's walks; spill: where a streamed model's base state goes between them."""
    start = time.perf_counter()
    kl = options.metric == "kl"
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    dtype = next(model.parameters()).dtype
    windows = windows.to(device)
    n_windows, seq_len = windows.shape
    hidden, layer_args = capture_layer_inputs(model, windows, device)
    originals = list(layers)
    replaced: list[tuple[nn.Module, str, nn.Module]] = []  # (layer, name, original module): the base state
    per_matrix = options.scaling.startswith("fisher")  # fisher belongs to the weight, not the stream
    svds: dict[str, _MatrixSVD] = {}  # kept on `offload`
    sigmas: dict[str, list[float]] = {}
    base_ranks: dict[str, int | None] = {}
    candidate_ranks: dict[str, dict[float, int | None]] = {}
    original_of: dict[str, nn.Module] = {}
    names_of_layer: list[list[str]] = []
    stream = layer_stream(model)
    if stream is not None:  # a peak that does not grow with the depth (utils.layerwise.fix_mmap_threshold)
        fix_mmap_threshold()

    def run(layer: nn.Module, h: torch.Tensor, index: int) -> torch.Tensor:
        return run_layer(layer, h, layer_args[index])

    @contextmanager
    def layer_read(index: int) -> Iterator[None]:
        """Within the block a streamed layer's weights are read (a no-op for a model in memory)."""
        if stream is not None:  # (the model's list holds head_on_hidden's stand-ins meanwhile)
            stream.load(model, index, originals[index])
        try:
            yield
        finally:
            if stream is not None:
                stream.release(model, index, originals[index])
                gc.collect()  # as walk_layers: what cycles hold of the layer's work goes before the next read

    @contextmanager
    def later_layer(index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` in the base state on the device, for the streams that pass through it."""
        with layer_read(index):
            undo = spill.load(originals[index], index) if spill is not None else None
            try:
                with layer_on_device(originals[index], device, offload) as layer:
                    yield layer
            finally:
                if undo is not None:
                    undo()

    def svd_of(full: str, linear: nn.Module, factors: dict, stats_tensors, streams, name: str) -> _MatrixSVD:
        stream = streams.get(name)
        slot = full if per_matrix else stream
        if slot not in factors:
            factors[slot] = input_factor(stats_tensors, stream, device, options,
                                         stats.fisher(full) if per_matrix else None)
        wanted = [r for r in candidate_ranks[full].values() if r is not None]
        if base_ranks[full] is not None:
            wanted.append(base_ranks[full])
        svd = _MatrixSVD(linear.weight.detach(), factors[slot], max(wanted), options.svd_dtype,
                         options.svd_driver, offload)
        sigmas[full] = [float(s) for s in svd.sigma]
        return svd

    try:
        with head_on_hidden(model, device) as head:
            def head_logits(h: torch.Tensor, w: int) -> torch.Tensor:
                return head(h, windows[w:w + 1]).logits[0]

            # ---- walk 1, the two streams: original (the kl reference) and base state. With a base
            # state every matrix's SVD is taken here, once, and kept for the measuring walk.
            original_h = hidden.clone() if (kl and options.base_ratio is not None) else None
            base_h = hidden
            for index, layer in enumerate(tqdm(originals, desc="sensitivity: base state", disable=not progress)):
                with layer_read(index):
                    first = len(replaced)
                    try:
                        with layer_on_device(layer, device, offload):
                            if original_h is not None:
                                original_h = run(layer, original_h, index)
                            names_of_layer.append([])
                            stats_tensors, streams = None, {}
                            if options.base_ratio is not None and stats is not None:
                                stats_tensors, streams = stats.layer(index)
                            factors: dict = {}
                            for name, linear in target_linears(layer).items():
                                full = f"{prefix}.{index}.{name}"
                                names_of_layer[-1].append(name)
                                original_of[full] = linear
                                m, n = linear.out_features, linear.in_features
                                candidate_ranks[full] = {p: candidate_rank(m, n, p) for p in options.ratios}
                                base_ranks[full] = None if options.base_ratio is None else rank_for_ratio(m, n, options.base_ratio)
                                if base_ranks[full] is None:
                                    continue
                                svds[full] = svd_of(full, linear, factors, stats_tensors, streams, name)
                                bias = linear.bias.detach() if linear.bias is not None else None
                                replaced.append((layer, name, linear))
                                set_submodule(layer, name, svds[full].module(base_ranks[full], bias, dtype, device))
                            base_h = run(layer, base_h, index)
                        if spill is not None:  # the factors to disk until the measuring walk reads them
                            kept = [(name, f"{prefix}.{index}.{name}") for name in names_of_layer[index]]
                            kept = [(name, full, base_ranks[full]) for name, full in kept if full in svds]
                            spill.save(index, {full: svds.pop(full) for _, full, _ in kept}, kept)
                    finally:
                        if spill is not None:  # its original modules back before the layer is released
                            for owner, name, original in reversed(replaced[first:]):
                                set_submodule(owner, name, original)
                            del replaced[first:]
            final_base = base_h
            if original_h is None:
                original_h = final_base  # the base state is the original model
            # ---- the reference distribution (kl): original log-probs, stored when small enough
            store_logprobs = kl and n_windows * seq_len * _vocab(model) * 4 <= options.logprob_cache_bytes
            original_logprobs = None
            if store_logprobs:
                original_logprobs = torch.stack([torch.log_softmax(head_logits(original_h[w:w + 1], w).float(), -1)
                                                 for w in range(n_windows)])

            def reference(w: int) -> torch.Tensor:
                if original_logprobs is not None:
                    return original_logprobs[w]
                return torch.log_softmax(head_logits(original_h[w:w + 1], w).float(), -1)

            def metric(final: torch.Tensor) -> float:
                total = torch.zeros((), dtype=torch.float64)
                for w in range(n_windows):
                    logits = head_logits(final[w:w + 1], w)
                    total += (_kl_mean(reference(w), logits) if kl else _nll_sum(logits, windows[w])).cpu()
                if kl:
                    return float(total) / (n_windows * seq_len)
                return math.exp(float(total) / (n_windows * (seq_len - 1)))

            base_value = metric(final_base)
            if not math.isfinite(base_value):
                raise SensitivityError(f"the {options.metric} of the base state ({options.base_state()}) is {base_value}: "
                                       f"not finite; use --dtype float32 or a smaller --ratio")
            evaluations = 1
            # ---- walk 2: one matrix at a time, the others in the base state
            values: dict[str, dict[float, float]] = {}
            bar = tqdm(total=sum(len(r) for r in candidate_ranks.values()), desc=f"sensitivity ({options.metric})",
                       disable=not progress)
            per_group = max(1, stream_bytes // max(1, hidden.numel() * hidden.element_size()))
            base_h = hidden
            for index in range(len(originals)):
                with later_layer(index) as layer:  # the source layer in the base state
                    if spill is not None:
                        svds.update(spill.svds(index))
                    stats_tensors, streams = None, {}
                    if options.base_ratio is None and stats is not None:
                        stats_tensors, streams = stats.layer(index)
                    factors = {}
                    jobs: list[tuple[str, str, int | None, _MatrixSVD | None]] = []  # (full, name, rank, svd)
                    rows: dict[str, dict[float, float | int]] = {}  # p -> a value (float) or its job's index (int)
                    for name in names_of_layer[index]:
                        full = f"{prefix}.{index}.{name}"
                        svd = svds.pop(full, None)
                        if svd is None and any(r is not None for r in candidate_ranks[full].values()):
                            svd = svd_of(full, original_of[full], factors, stats_tensors, streams, name)
                        row, dense_job = {}, None
                        for p, rank in candidate_ranks[full].items():
                            if rank == base_ranks[full]:
                                row[p] = base_value  # the base state itself
                            elif rank is None and dense_job is not None:
                                row[p] = dense_job  # a rank that would not shrink it: dense
                            else:
                                row[p] = len(jobs)
                                if rank is None:
                                    dense_job = len(jobs)
                                jobs.append((full, name, rank, svd))
                        rows[full] = row
                    results: list[float] = []
                    for first in range(0, len(jobs), per_group):
                        results += _measure_group(jobs[first:first + per_group], layer, base_h, index, len(originals),
                                                  later_layer, original_of, run, metric, dtype, device)
                    evaluations += len(jobs)
                    for full, row in rows.items():
                        for p, value in row.items():
                            row[p] = value if isinstance(value, float) else results[value]
                            if not math.isfinite(row[p]):
                                raise SensitivityError(
                                    f"sensitivity of {full} at kept fraction {p:g} (rank {candidate_ranks[full][p]}) "
                                    f"is {row[p]}: not finite; use --dtype float32 or drop that candidate from "
                                    f"--sensitivity_ratios")
                            bar.update(1)
                        values[full] = row
                    base_h = run(layer, base_h, index)
            bar.close()
    finally:
        for layer, name, original in reversed(replaced):
            set_submodule(layer, name, original)
    return SensitivityTable(key, values, base_value, candidate_ranks, sigmas, time.perf_counter() - start, evaluations)


def _measure_group(jobs: list, layer: nn.Module, inputs: torch.Tensor, index: int, num_layers: int,
                   later_layer: Callable[[int], ContextManager[nn.Module]], original_of: dict[str, nn.Module], run,
                   metric, dtype: torch.dtype, device: torch.device | str) -> list[float]:
    """The metric of each job (a matrix of `layer`, decoder layer `index`, on the device, at a rank;
    None: dense): the job's stream through `layer` from `inputs`, then through every later layer,
    each brought to the device (later_layer(i): in the base state) once for all the jobs' streams."""
    streams = []
    for full, name, rank, svd in jobs:
        current = layer.get_submodule(name)  # the base state's module
        original = original_of[full]
        if rank is None:  # the dense original: device copies of its tensors meanwhile
            restore, module = copies_to(original, device), original
        else:
            bias = original.bias.detach() if original.bias is not None else None
            restore, module = None, svd.module(rank, bias, dtype, device)
        set_submodule(layer, name, module)
        try:
            streams.append(run(layer, inputs, index))
        finally:
            set_submodule(layer, name, current)
            if restore is not None:
                restore()
    for later in range(index + 1, num_layers):
        with later_layer(later) as next_layer:
            streams = [run(next_layer, h, later) for h in streams]
    return [metric(h) for h in streams]


def _vocab(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def sensitivity_table(model: nn.Module, windows: torch.Tensor | None, stats, device: torch.device | str,
                      options: SensitivityOptions, path: str | None = None, windows_info: dict | None = None,
                      overwrite: bool = False, progress: bool = True) -> tuple[SensitivityTable, bool]:
    """The table for this model, statistics, windows and options: read from `path` when it is there
    and its key matches (also with `overwrite`: measuring again would give the same table); when
    it does not match, SensitivityError naming the differing field, or with `overwrite` measured
    anew. Otherwise measured and written to `path` (atomically), a streamed model's base state
    spilled to a scratch folder beside it meanwhile (measure_sensitivity). Returns (table, reused)."""
    key = table_key(model, stats, windows, options, windows_info)
    if path is not None and os.path.exists(path):
        try:
            return load_table(path, key), True
        except SensitivityError:
            if not overwrite:
                raise
    if options.metric == "stable_rank":
        table = stable_rank_table(model, options, key)
    else:
        if windows is None:
            raise ValueError(f"the {options.metric} sensitivity needs calibration windows")
        # a streamed model's base state waits beside the table (on disk; the system's temporary folder may be in memory)
        spill_dir = os.path.dirname(os.path.abspath(path)) if path is not None else None
        table = measure_sensitivity(model, windows, stats, device, options, key, progress, spill_dir=spill_dir)
    if path is not None:
        table.save(path)
    return table, False


# What the --ppl_target search does not apply when it compresses a candidate (each would multiply
# the search's cost): the model step 3 builds with any of them differs from the one the search measured.
NOT_SEARCHED = "column preservation, the update (closed-form or anchored) and the refinement"


def searched_decomposition(decompose=None):
    """The DecomposeOptions the --ppl_target search compresses its candidates with: step 3's
    (`decompose`: whitening or scaling, SVD or RSVD, sigma fuse, SVD precision and driver) less
    column preservation."""
    from methods.decompose import DecomposeOptions
    return replace(decompose or DecomposeOptions(), column_preserve=False)


@torch.no_grad()
def calibration_ppl(model: nn.Module, windows: torch.Tensor, device: torch.device | str,
                    offload: torch.device | str = "cpu") -> float:
    """Perplexity of `model` on `windows`, each window's first token unscored: the number the
    --ppl_target search compares with its target, and step 3 with it after building. Layer by layer
    (one decoder layer on `device` at a time, then the head); the model is left on `offload`."""
    return _walk_ppl(model, windows, device, None, offload)


@torch.no_grad()
def _walk_ppl(model: nn.Module, windows: torch.Tensor, device: torch.device | str,
              change: Callable[[LayerContext], Callable[[], None]] | None, offload: torch.device | str) -> float:
    """calibration_ppl with each layer as change(context) makes it (on the device; the function it
    returns puts the layer back as it was, after the layer's outputs are taken)."""
    final: dict[str, torch.Tensor] = {}

    def run(context: LayerContext) -> torch.Tensor:
        undo = change(context) if change is not None else None
        try:
            final["hidden"] = context.run()
        finally:
            if undo is not None:
                undo()
        return final["hidden"]

    walk_layers(model, windows, device, run, desc="calibration ppl", offload=offload, changes_weights=False)
    total = torch.zeros((), dtype=torch.float64)
    with head_on_hidden(model, device) as head:
        for w in range(windows.shape[0]):
            ids = windows[w:w + 1].to(device)
            total += _nll_sum(head(final["hidden"][w:w + 1], ids).logits[0], ids[0]).cpu()
    return math.exp(float(total) / (windows.shape[0] * (windows.shape[1] - 1)))


def plan_calibration_ppl(model: nn.Module, stats, windows: torch.Tensor, device: torch.device | str,
                         decompose=None, offload: torch.device | str = "cpu"):
    """ranks -> calibration perplexity on `windows` of `model` compressed by those ranks with
    searched_decomposition(decompose) (step 3's decomposition; default: DecomposeOptions()): what
    ASVD's --ppl_target search evaluates. Not applied: NOT_SEARCHED. Each layer is compressed on the
    device during the walk and put back as it was once its outputs are taken: no copy of the model."""
    from methods.decompose import Decompose
    from utils.model import target_shapes
    from utils.plan import ModulePlan, Plan
    shapes = target_shapes(model)
    decompose = searched_decomposition(decompose)

    def evaluate(ranks: dict) -> float:
        plan = Plan({n: ModulePlan(m, k, b, ranks.get(n)) for n, (m, k, b) in shapes.items()}, None, "asvd")
        if not plan.ranks:
            return calibration_ppl(model, windows, device, offload)
        compress_layer = Decompose(plan, decompose, stats if decompose.needs_stats else None)

        def change(context: LayerContext) -> Callable[[], None]:
            before = dict(target_linears(context.layer))
            compress_layer(context)

            def undo() -> None:
                for name, module in before.items():
                    set_submodule(context.layer, name, module)
            return undo

        return _walk_ppl(model, windows, device, change, offload)

    return evaluate


# ---------------------------------------------------------------------------------------- flags

GROUP = "decomposition"
FLAGS = (
    Flag(("--sensitivity_metric",), "sensitivity_metric", GROUP, choices=("ppl", "stable_rank", "kl"),
         help="asvd: ppl = calibration perplexity with only that matrix compressed (default), stable_rank "
              "= ASVD's spectral metric (no forward pass); duo: kl (the only one)"),
    Flag(("--sensitivity_ratios",), "sensitivity_ratios", GROUP,
         help="candidate KEPT fractions, comma list in (0, 1], 1 = dense (default: duo 0.1,...,0.9,1 as "
              "Duo-SVD; asvd 0.1,...,0.9 as ASVD)"),
    Flag(("--sensitivity_nsamples",), "sensitivity_nsamples", GROUP, default=16, type=int,
         help="calibration windows (--dataset, --sensitivity_seq_len) of the sensitivity pass (default "
              "%(default)s); cost: matrices x candidates x these windows through the layers after each "
              "matrix (estimated and printed before the pass starts)"),
    Flag(("--sensitivity_seq_len",), "sensitivity_seq_len", GROUP, type=int,
         help="tokens per window of the sensitivity pass (default: --model_seq_len); its cost grows "
              "with it"),
    Flag(("--sensitivity_path",), "sensitivity_path", GROUP,
         help="the sensitivity table (JSON; default STATS/sensitivity_METRIC[_rRATIO].json): reused when it "
              "was measured for this model, statistics, windows, candidates and base state, refused "
              "(naming the field) when not, unless --overwrite (then measured anew)"),
    Flag(("--use_cache",), "use_cache", GROUP, default=False, action="store_true",
         help="ASVD's flag: reuse the sensitivity table (the default behaviour here; accepted so ASVD "
              "commands run)"),
)


def check_flags(values: dict) -> dict:
    """The sensitivity flags of step 2: only with --allocation asvd or duo, each its own metric; the
    candidate ratios parsed (defaults: each paper's)."""
    allocation, metric, ppl_target = values["allocation"], values["sensitivity_metric"], values["ppl_target"]
    sensitivity_flags = {"--sensitivity_metric": metric, "--sensitivity_ratios": values["sensitivity_ratios"],
                         "--ppl_target": ppl_target, "--sensitivity_seq_len": values["sensitivity_seq_len"]}
    if allocation not in ("asvd", "duo"):
        given = [k for k, v in sensitivity_flags.items() if v is not None]
        if given:
            raise FlagError(f"{given[0]} belongs to --allocation asvd or duo (now {allocation})")
        return {}
    if allocation == "duo":
        if metric not in (None, "kl"):
            raise FlagError(f"--allocation duo measures KL divergence; --sensitivity_metric "
                            f"{metric} is for --allocation asvd")
        if ppl_target is not None:
            raise FlagError("--ppl_target is ASVD's search (--allocation asvd); duo meets --ratio")
        metric = "kl"
    else:
        if metric == "kl":
            raise FlagError("--sensitivity_metric kl is Duo-SVD's (--allocation duo); asvd takes ppl or stable_rank")
        metric = metric or "ppl"
        if ppl_target is not None and not (ppl_target > 0 and ppl_target < float("inf")):
            raise FlagError(f"--ppl_target {ppl_target}: a perplexity above 1, e.g. 40")
    given_ratios = values["sensitivity_ratios"]
    if given_ratios is None:
        ratios = DUO_RATIOS if allocation == "duo" else ASVD_RATIOS
    else:
        try:
            ratios = tuple(float(x) for x in str(given_ratios).split(","))
        except ValueError:
            raise FlagError(f"--sensitivity_ratios {given_ratios!r}: give kept fractions as a comma "
                            f"list, e.g. 0.2,0.4,0.6,0.8,1") from None
        bad = [r for r in ratios if not 0.0 < r <= 1.0]
        if bad:
            raise FlagError(f"--sensitivity_ratios: {bad[0]:g} is not a kept fraction in (0, 1] (1 = dense)")
        if len(set(ratios)) != len(ratios):
            raise FlagError("--sensitivity_ratios: a candidate is given twice")
        if not any(r < 1.0 for r in ratios):
            raise FlagError("--sensitivity_ratios: give at least one kept fraction below 1")
    if values["sensitivity_nsamples"] < 1:
        raise FlagError("--sensitivity_nsamples must be at least 1")
    seq_len = values["sensitivity_seq_len"]
    if seq_len is not None and seq_len < 2:
        raise FlagError(f"--sensitivity_seq_len {seq_len}: at least 2 tokens (a window's first "
                        f"token is not scored); leave it out for --model_seq_len")
    return {"sensitivity_metric": metric, "sensitivity_ratios": ratios}


METHOD = Method("sensitivity", FLAGS, check=check_flags, step=2)


# ---------------------------------------------------------------------------------------- allocations

@dataclass
class SensitivityAllocation(AllocationOptions):
    """An allocation over a sensitivity table (table: how it is measured; the driver measures or reuses
    it on `nsamples` windows of `seq_len` tokens, None: --model_seq_len)."""
    ratio: float
    table_options: SensitivityOptions
    nsamples: int = 16
    seq_len: int | None = None
    needs_stats = True

    @property
    def sensitivity(self) -> SensitivityOptions:
        return self.table_options

    @property
    def windows_needed(self) -> int:
        return 0 if self.table_options.metric == "stable_rank" else self.nsamples

    @property
    def window_len(self) -> int | None:
        return self.seq_len


@dataclass
class AsvdOptions(SensitivityAllocation):
    """--allocation asvd: ASVD's binary search to --ratio (asvd_plan), or with ppl_target to the most
    compression whose calibration perplexity stays below it (asvd_ppl_plan; its candidates compressed
    with `searched`, step 3's decomposition less column preservation: searched_decomposition)."""
    ppl_target: float | None = None
    searched: DecomposeOptions | None = None

    @property
    def windows_needed(self) -> int:
        return self.nsamples if self.ppl_target is not None else super().windows_needed

    def make_plan(self, inputs: PlanInputs) -> Plan:
        if self.ppl_target is None:
            plan, plan.detail = asvd_plan(inputs.model, self.ratio, inputs.table)
            return plan
        windows = inputs.windows
        plan, detail = asvd_ppl_plan(inputs.model, self.ppl_target, inputs.table,
                                     plan_calibration_ppl(inputs.model, inputs.stats, windows, inputs.device,
                                                          self.searched))
        # what the searched perplexity is of, so step 3 can say where its model differs and measure it
        detail["search"] = {"decompose": self.searched.to_dict(), "not_searched": NOT_SEARCHED,
                            "windows": {"dataset": inputs.windows_info["dataset"],
                                        "nsamples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                                        "seed": inputs.windows_info["seed"]}}
        plan.detail = detail
        return plan


@dataclass
class DuoOptions(SensitivityAllocation):
    """--allocation duo: Duo-SVD's knapsack DP over a KL table measured against every other matrix at
    --ratio (duo_plan)."""
    needs_whitening = True

    def make_plan(self, inputs: PlanInputs) -> Plan:
        plan, plan.detail = duo_plan(inputs.model, self.ratio, inputs.table)
        return plan


def table_options(values: dict, base_ratio: float | None) -> SensitivityOptions:
    """The sensitivity table the resolved flags ask for (check_flags has filled metric and ratios)."""
    from utils.model import DTYPES
    return SensitivityOptions(values["sensitivity_metric"], tuple(values["sensitivity_ratios"]), base_ratio,
                              values["whitening"], values["scaling"], values["alpha"],
                              svd_dtype=DTYPES[values["svd_dtype"]], svd_driver=values["svd_driver"])


def asvd_options(values: dict) -> AsvdOptions:
    from methods.decompose import options_from_flags
    target = values["ppl_target"]
    return AsvdOptions(values["ratio"], table_options(values, None), values["sensitivity_nsamples"],
                       values["sensitivity_seq_len"], target,
                       searched_decomposition(options_from_flags(values)) if target is not None else None)


def duo_options(values: dict) -> DuoOptions:
    return DuoOptions(values["ratio"], table_options(values, values["ratio"]), values["sensitivity_nsamples"],
                      values["sensitivity_seq_len"])


ASVD = Method("asvd", options=asvd_options, selector="allocation", step=2)
DUO = Method("duo", options=duo_options, selector="allocation", step=2)
