"""The sequential layer walker that every method shares (the GPTQ / SparseGPT pattern).

1. Capture: run the calibration windows through the model with every decoder layer replaced
   by a recorder that returns its input unchanged. Layer 0's recorder keeps the hidden states
   (the inputs of the first layer); every recorder keeps the keyword arguments its layer is
   called with (attention mask, rotary tables...), which may differ per layer (Gemma 3
   alternates sliding-window and global attention). Only the non-layer modules (embeddings,
   rotary tables) are on the device meanwhile.
2. Walk: for each decoder layer, move it to the device, let the caller do its work (hooks,
   replacing modules) while running the inputs through it, and keep the outputs as the next
   layer's inputs; then move the layer back. One layer's weights, the activations of the
   calibration windows and the layer's statistics are all that the device holds.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from utils.model import copies_to, decoder_layers, non_layer_modules_to


class _StopForward(Exception):
    pass


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


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: torch.Tensor, layer_args: tuple[tuple, dict],
              indices: range | None = None) -> torch.Tensor:
    """Outputs of `layer` for inputs[indices] (default: all), one window at a time."""
    args, kwargs = layer_args
    indices = range(inputs.shape[0]) if indices is None else indices
    outputs = torch.empty((len(indices),) + inputs.shape[1:], dtype=inputs.dtype, device=inputs.device)
    for k, i in enumerate(indices):
        out = layer(inputs[i:i + 1], *args, **kwargs)
        outputs[k] = (out[0] if isinstance(out, tuple) else out)[0]
    return outputs


LayerFn = Callable[[int, nn.Module, Callable[..., torch.Tensor]], torch.Tensor]


@torch.no_grad()
def walk_layers(model: nn.Module, windows: torch.Tensor, device: torch.device | str, fn: LayerFn,
                desc: str, offload: torch.device | str = "cpu", changes_weights: bool = True) -> None:
    """Call fn(index, layer_on_device, run) for every decoder layer in order.

    run(indices=None) runs the current inputs through the layer (hooks fire) and returns the
    outputs; fn returns the outputs that become the next layer's inputs. With
    changes_weights=False fn promises to change no weight in place: the layer's original
    offloaded tensors are put back instead of copying the device ones back (anything fn added or
    replaced is still moved to `offload`).
    """
    inputs, layer_args = capture_layer_inputs(model, windows, device)
    layers = decoder_layers(model)
    for index in tqdm(range(len(layers)), desc=desc):
        restore = None if changes_weights else copies_to(layers[index], device)
        layer = layers[index] if restore else layers[index].to(device)

        def run(indices: range | None = None, _layer=layer, _index=index) -> torch.Tensor:
            return run_layer(_layer, inputs, layer_args[_index], indices)

        try:
            inputs = fn(index, layer, run)
        finally:  # also on an error or Ctrl-C: the model is left whole on `offload`
            if restore is not None:
                restore()
            layers[index] = layer.to(offload)  # a no-op for what restore() put back
