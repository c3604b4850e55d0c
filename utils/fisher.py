"""ASVD's fisher information of every target linear, by a layer-by-layer backward pass.

For each calibration window w, g_w = dL_w / dW is the gradient of the window's language-model
loss (mean next-token cross-entropy, the loss a causal LM computes with labels = its inputs)
with respect to a weight W (out x in). The statistic per input channel j is

    fisher_j = sqrt( (1 / N) sum_w sum_i g_w[i, j]^2 ),

the mean over windows of the squared per-window gradient (ASVD accumulates grad^2 after each
calibration sample's backward, batch size 1, and divides by the number of samples), summed over
output rows (ASVD takes their mean: a constant factor m, which no truncation sees), square-rooted.

Memory stays bounded as in the walk (utils.layerwise): a forward pass keeps each decoder layer's
inputs on `offload`; then from the top down, the head's gradient (the model's own final norm
and lm_head, fed through its forward with the decoder layers standing aside) enters the last
layer, and each layer in turn goes to the device, recomputes one window at a time with
gradients, adds that window's squared weight gradients, and hands the input gradient to the
layer below. One layer, one window's activations and the per-window output gradients of one
layer are on the device at a time.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from utils.layerwise import capture_layer_inputs, run_layer
from utils.model import decoder_layers, layer_prefix, non_layer_modules_to, target_linears


class _Inject(nn.Module):
    """Stands in for decoder layer 0 (returning the given hidden states, the last layer's output)
    and for every other layer (returning its input): the model's forward is then the head alone."""

    def __init__(self, hidden: dict, first: bool):
        super().__init__()
        self.hidden, self.first = hidden, first

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.hidden["value"] if self.first else hidden_states


def head_gradient(model: nn.Module, window: torch.Tensor, last_output: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(dL/dh, L) for one window: L the LM loss of the model's head on h = last_output (1 x L x d)."""
    layers = decoder_layers(model)
    originals = list(layers)
    hidden = {"value": last_output.detach().requires_grad_(True)}
    try:
        for j in range(len(layers)):
            layers[j] = _Inject(hidden, first=(j == 0))
        with torch.enable_grad():
            out = model(window[None], labels=window[None], use_cache=False)
            (gradient,) = torch.autograd.grad(out.loss, [hidden["value"]])
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer
    return gradient, float(out.loss.detach())


def _layer_call(layer: nn.Module, hidden: torch.Tensor, layer_args: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = layer_args
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def fisher_information(model: nn.Module, windows: torch.Tensor, device: torch.device | str,
                       offload: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Fisher vector (in,) float64 of every target linear, by qualified name, and a summary
    (windows, mean loss). windows: N x L token ids."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    num_windows = windows.shape[0]
    inputs, layer_args = capture_layer_inputs(model, windows, device)
    # forward: the inputs of every layer, kept on `offload`
    kept: list[torch.Tensor] = []
    for index in tqdm(range(len(layers)), desc="fisher forward"):
        kept.append(inputs.to(offload))
        layer = layers[index].to(device)
        with torch.no_grad():
            inputs = run_layer(layer, inputs, layer_args[index])
        layers[index] = layer.to(offload)
    # head: per-window gradient of the loss at the last layer's output
    restore = non_layer_modules_to(model, device)
    losses = []
    try:
        gradients = torch.empty_like(inputs)
        for w in tqdm(range(num_windows), desc="fisher head", leave=False):
            gradients[w:w + 1], loss = head_gradient(model, windows[w].to(device), inputs[w:w + 1])
            losses.append(loss)
    finally:
        restore()
    del inputs
    fisher: dict[str, torch.Tensor] = {}
    for index in tqdm(reversed(range(len(layers))), total=len(layers), desc="fisher backward"):
        layer = layers[index].to(device)
        linears = target_linears(layer)
        flags = {name: linear.weight.requires_grad for name, linear in linears.items()}
        sums = {name: torch.zeros(linear.in_features, dtype=torch.float64, device=device)
                for name, linear in linears.items()}
        layer_inputs = kept[index]
        below = torch.empty(layer_inputs.shape, dtype=gradients.dtype, device=device) if index else None
        try:
            for linear in linears.values():
                linear.weight.requires_grad_(True)
            weights = [linear.weight for linear in linears.values()]
            for w in range(num_windows):
                hidden = layer_inputs[w:w + 1].to(device).requires_grad_(index > 0)
                with torch.enable_grad():
                    output = _layer_call(layer, hidden, layer_args[index])
                    wanted = ([hidden] if index > 0 else []) + weights
                    grads = torch.autograd.grad(output, wanted, grad_outputs=gradients[w:w + 1].to(device))
                if index > 0:
                    below[w:w + 1] = grads[0]
                for name, grad in zip(linears, grads[1 if index > 0 else 0:]):
                    sums[name] += grad.to(torch.float64).square().sum(0)
        finally:
            for name, linear in linears.items():
                linear.weight.requires_grad_(flags[name])
            layers[index] = layer.to(offload)
        for name, total in sums.items():
            fisher[f"{prefix}.{index}.{name}"] = (total / num_windows).sqrt().cpu()
        gradients = below
        kept[index] = None
    fisher = {name: fisher[name] for name in _order(model)}  # layer order, as target_shapes
    summary = {"windows": int(num_windows), "seq_len": int(windows.shape[1]),
               "mean_loss": sum(losses) / len(losses) if losses else None,
               "definition": "sqrt(mean over windows of the squared per-window LM-loss gradient, summed over output rows)"}
    return fisher, summary


def _order(model: nn.Module):
    prefix = layer_prefix(model)
    for index, layer in enumerate(decoder_layers(model)):
        for name in target_linears(layer):
            yield f"{prefix}.{index}.{name}"
