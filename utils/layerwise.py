"""The sequential layer walker that every method shares (the GPTQ / SparseGPT pattern).

1. Capture: run the calibration windows through the model with every decoder layer replaced
   by a recorder that returns its input unchanged. Layer 0's recorder keeps the hidden states
   (the inputs of the first layer); every recorder keeps the keyword arguments its layer is
   called with (attention mask, rotary tables...), which may differ per layer (Gemma 3
   alternates sliding-window and global attention). Only the non-layer modules (embeddings,
   rotary tables) are on the device meanwhile.
2. Walk: for each decoder layer, move it to the device, hand the caller a LayerContext (the
   layer, its inputs and call arguments, run / capture / collect) to do its work (replacing
   modules), and keep the layer's outputs as the next layer's inputs; then move the layer back.
   A pass sees the inputs of the layer's modules only through recording_inputs (its hooks, and
   stopping the layer once the modules it asks for have run).
   A two-stream walk also carries the original model's activations (the reference stream). One layer's weights, the activations of the
   calibration windows and the layer's statistics are all that the device holds.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from component.low_rank_linear import forget_fused_inputs
from utils.capture import StopLayer, recording_inputs  # noqa: F401  (re-exported: the passes' names)
from utils.model import copies_to, decoder_layers, layer_prefix, layer_stream, non_layer_modules_to
from utils.stats import LayerStatsCollector


class _StopForward(Exception):
    pass


GLIBC_MMAP_THRESHOLD = -3  # mallopt's M_MMAP_THRESHOLD
GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold(threshold: int = GLIBC_DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (mallopt M_MMAP_THRESHOLD), which turns its dynamic adjustment off.
    Why: glibc raises the threshold, up to 32 MiB, each time a block it had mmapped is freed; the
    blocks under it then come from the heap, which keeps what is freed and fragments, so a streamed
    walk's per-layer temporaries (statistics, Gram unpacking, whitening, SVD work space) kept landing
    on new pages and the peak resident memory grew with the depth although nothing was retained
    (docs/scale.md). At a fixed threshold every large tensor is mmapped and returned to the system
    when freed. Process-wide and idempotent; False where the C library is not glibc."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(GLIBC_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


class _Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records its inputs, changes nothing."""

    def __init__(self, index: int, last: int, record_kwargs: bool, sink: dict):
        super().__init__()
        self.index, self.last, self.record_kwargs, self.sink = index, last, record_kwargs, sink

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.index == 0:
            self.sink["hidden"].append(hidden_states)
            if not self.record_kwargs:
                raise _StopForward
        if self.record_kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            self.sink["layer_args"].append((args, kwargs))
            if self.index == self.last:
                raise _StopForward
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device | str
                         ) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """Hidden states entering layer 0 (N x L x d, on device) and each layer's call arguments.

    Windows are run one at a time, so the recorded arguments (for a batch of one window of
    this length) are valid for every window. The non-layer modules go back where they were.
    """
    layers = decoder_layers(model)
    originals = list(layers)
    sink: dict = {"hidden": [], "layer_args": []}
    restore_non_layer = non_layer_modules_to(model, device)
    try:
        for i, window in enumerate(tqdm(windows, desc="capture inputs", leave=False)):
            for j in range(len(layers)):
                layers[j] = _Recorder(j, len(layers) - 1, record_kwargs=(i == 0), sink=sink)
            try:
                model(window[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer
        restore_non_layer()
    return torch.cat(sink["hidden"]), sink["layer_args"]


def call_layer(layer: nn.Module, hidden: torch.Tensor, layer_args: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden states `layer` outputs for `hidden` (one window: 1 x L x d) called with its recorded
    arguments (a decoder layer returns them alone or first in a tuple); gradients flow where enabled."""
    args, kwargs = layer_args
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: torch.Tensor, layer_args: tuple[tuple, dict],
              indices: range | None = None) -> torch.Tensor:
    """Outputs of `layer` for inputs[indices] (default: all), one window at a time."""
    indices = range(inputs.shape[0]) if indices is None else indices
    outputs = torch.empty((len(indices),) + inputs.shape[1:], dtype=inputs.dtype, device=inputs.device)
    for k, i in enumerate(indices):
        outputs[k] = call_layer(layer, inputs[i:i + 1], layer_args)[0]
    return outputs


@contextmanager
def layer_on_device(layer: nn.Module, device: torch.device | str, offload: torch.device | str = "cpu",
                    changes_weights: bool = False, keep: frozenset[int] = frozenset()) -> Iterator[nn.Module]:
    """The one way a decoder layer comes to the device: within the block `layer` (the same module)
    computes on `device`; after it, also on an error, it is on `offload` again. With
    changes_weights=False the block promises to change no weight in place: device copies stand in
    for the layer's tensors and the originals are put back (utils.model.copies_to: no copy back
    from the device); modules the block added or replaced are moved to `offload`.
    keep: ids of tensors that live on the device already and stay there (trained adapters, whose
    gradients must reach the tensors themselves); with them the block may add no module."""
    if keep and changes_weights:
        raise ValueError("keep is for a block that changes no weight (changes_weights=False)")
    restore = None if changes_weights else copies_to(layer, device, skip=keep)
    if restore is None:
        layer.to(device)
    try:
        yield layer
    finally:
        if restore is not None:
            restore()
        if not keep:
            layer.to(offload)  # a no-op for what restore() put back
        # fused v factors (component.SharedInputProjection) made from the device tensors: a stale
        # copy on the device that would stay there, layer after layer
        forget_fused_inputs(layer)


@torch.no_grad()
def feed_layer(layer: nn.Module, inputs: torch.Tensor, layer_args: tuple[tuple, dict],
               indices: range | None = None) -> None:
    """Run inputs[indices] (default: all) through `layer` one window at a time, for the hooks a
    pass registered on it: a hook may end a window's pass early by raising StopLayer."""
    for i in range(inputs.shape[0]) if indices is None else indices:
        try:
            run_layer(layer, inputs, layer_args, range(i, i + 1))
        except StopLayer:
            pass


def first_inputs(layer: nn.Module, modules: dict[str, nn.Module], inputs: torch.Tensor,
                 layer_args: tuple[tuple, dict], indices: range | None = None) -> list[dict[str, torch.Tensor]]:
    """For each window of inputs[indices] (default: all), the input of each of `modules` at its
    first call, by name in the order they were first called (as recording_inputs hands them); each
    window's pass through `layer` ends once all of them were called. A module that did not run in
    a window is missing from that window's dict."""
    captured: list[dict[str, torch.Tensor]] = []
    with recording_inputs(modules, lambda name, x: captured[-1].setdefault(name, x), stop_layer=layer):
        for i in range(inputs.shape[0]) if indices is None else indices:
            captured.append({})
            feed_layer(layer, inputs, layer_args, range(i, i + 1))
    return captured


@dataclass
class LayerContext:
    """What a pass sees of the layer being compressed.

    `inputs` are the compressed model's inputs to this layer (the outputs of the layers already
    compressed); with a reference stream, `reference_inputs` are the original model's inputs to
    this layer and `reference_outputs` the original layer's outputs on them, computed before any
    pass changed the layer. Without activations (no pass needs them) inputs are None.
    """

    index: int
    name: str  # qualified name of the layer, e.g. "model.layers.3"
    layer: nn.Module  # on `device`
    device: torch.device | str
    inputs: torch.Tensor | None = None
    layer_args: tuple[tuple, dict] | None = None
    reference_inputs: torch.Tensor | None = None
    reference_outputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None  # a pass that ran the whole layer may leave its outputs here
    scratch: dict = field(default_factory=dict)  # what one pass hands the next within this layer

    @property
    def num_windows(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[0]

    def _need_inputs(self) -> None:
        if self.inputs is None:
            raise RuntimeError("this walk carries no activations: a pass that runs the layer must say "
                               "needs_activations = True")

    def run(self, indices: range | None = None) -> torch.Tensor:
        """Outputs of the layer as it is now for inputs[indices] (default: all); hooks fire."""
        self._need_inputs()
        return run_layer(self.layer, self.inputs, self.layer_args, indices)

    def feed(self, indices: range | None = None) -> None:
        """feed_layer on this layer's inputs[indices] (default: all), for the hooks a pass registered."""
        self._need_inputs()
        feed_layer(self.layer, self.inputs, self.layer_args, indices)

    def capture(self, modules: dict[str, nn.Module], record: Callable[[str, torch.Tensor], None],
                indices: range | None = None, stop: bool = True) -> None:
        """Feed inputs[indices] (default: all) with every input of `modules` handed to record(name, x)
        (recording_inputs); stop: end each window's pass once every one of `modules` was called."""
        with recording_inputs(modules, record, stop_layer=self.layer if stop else None):
            self.feed(indices)

    def first_inputs(self, modules: dict[str, nn.Module], indices: range | None = None,
                     reference: bool = False) -> list[dict[str, torch.Tensor]]:
        """first_inputs of `modules` for inputs[indices] (default: all); reference: for the
        reference stream's inputs (the original model's) instead."""
        self._need_inputs()
        inputs = self.reference_inputs if reference else self.inputs
        if inputs is None:
            raise RuntimeError("this walk carries no reference stream: the pass must say needs_reference = True")
        return first_inputs(self.layer, modules, inputs, self.layer_args, indices)

    def collect(self, modules: dict[str, nn.Module], indices: range | None = None,
                stop_after: bool = False) -> LayerStatsCollector:
        """Input statistics (Gram, |x|) of `modules` over inputs[indices] (recording_inputs).
        stop_after: end each window's forward pass once every one of `modules` has run (the
        rest of the layer is not needed for their inputs)."""
        self._need_inputs()
        with LayerStatsCollector(modules, self.device, stop_layer=self.layer if stop_after else None) as collector:
            self.feed(indices)
        return collector


LayerFn = Callable[[LayerContext], "torch.Tensor | None"]


@torch.no_grad()
def walk_layers(model: nn.Module, windows: torch.Tensor | None, device: torch.device | str, fn: LayerFn,
                desc: str, offload: torch.device | str = "cpu", changes_weights: bool = True,
                reference: bool = False, finished: Callable[[int, nn.Module], None] | None = None,
                start: int = 0, replay: Callable[[LayerContext], None] | None = None) -> None:
    """Call fn(context) for every decoder layer in order, the layer on `device`.

    With `windows`, the calibration activations flow through the walk: fn may run the layer
    (context.run / collect); its return value, or else the outputs of the layer as fn left it,
    become the next layer's inputs. Without windows nothing is captured or run (passes that only
    read the statistics of step 1). reference=True carries the original model's stream beside the
    compressed one (two-stream walk): each layer's reference outputs are computed from its
    reference inputs before fn changes it. With changes_weights=False fn promises to change no
    weight in place: the layer's original offloaded tensors are put back instead of copying the
    device ones back (anything fn added or replaced is still moved to `offload`).

    finished(index, layer) is called with each layer fn has done, back on `offload` (to write it
    out). A streamed model (utils.model.LayerStream) has each layer read from disk before it is
    reached and put back on the meta device after. start: the layers before it were done by an
    earlier, interrupted run: fn is not called for them; replay(context) puts a layer in its done
    state instead (its original weights are read only when activations flow), and the layer's
    outputs as replay left it carry the activations on.
    """
    if reference and windows is None:
        raise ValueError("a reference stream needs calibration windows")
    inputs = layer_args = reference_inputs = None
    if windows is not None:
        inputs, layer_args = capture_layer_inputs(model, windows, device)
        reference_inputs = inputs.clone() if reference else None
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    stream = layer_stream(model)
    if stream is not None:  # a peak that does not grow with the depth (step 3: 25% of a layer per layer)
        fix_mmap_threshold()
    for index in tqdm(range(len(layers)), desc=desc):
        done_before = index < start
        if done_before and windows is None:  # nothing flows: the done layer is only put in its final form
            context = LayerContext(index, f"{prefix}.{index}", layers[index], device)
            try:
                if replay is not None:
                    replay(context)
            finally:
                if stream is not None:
                    stream.release(model, index)
                context = None
            continue
        if stream is not None:
            stream.load(model, index)
        try:
            if done_before:  # activations flow through a layer an earlier run did
                reference_outputs = None
                if reference:  # the reference stream runs the original layer
                    with layer_on_device(layers[index], device, offload, changes_weights=False) as layer:
                        reference_outputs = run_layer(layer, reference_inputs, layer_args[index])
                context = LayerContext(index, f"{prefix}.{index}", layers[index], device, inputs,
                                       None if layer_args is None else layer_args[index])
                context.reference_inputs = reference_inputs if reference else None
                context.reference_outputs = reference_outputs
                if replay is not None:  # the done layer is put in place on `offload`
                    replay(context)
                with layer_on_device(layers[index], device, offload, changes_weights=False) as layer:
                    context.layer = layer
                    outputs = context.outputs if context.outputs is not None else context.run()
                inputs = outputs
                reference_inputs = context.reference_outputs
                layer = context = None
            else:
                # also on an error or Ctrl-C the model is left whole on `offload`
                with layer_on_device(layers[index], device, offload, changes_weights) as layer:
                    context = LayerContext(index, f"{prefix}.{index}", layer, device, inputs,
                                           None if layer_args is None else layer_args[index])
                    if reference:
                        context.reference_inputs = reference_inputs
                        context.reference_outputs = run_layer(layer, reference_inputs, layer_args[index])
                    outputs = fn(context)
                    if windows is not None:
                        if outputs is None:
                            outputs = context.outputs if context.outputs is not None else context.run()
                        inputs = outputs
                        reference_inputs = context.reference_outputs
                    layer = context = None
                if finished is not None:
                    finished(index, layers[index])
        finally:
            if stream is not None:
                stream.release(model, index)
                # a pass's hooks and collectors form reference cycles: collect them now, so that one
                # layer's float64 statistics are not still held when the next layer's are summed
                gc.collect()
