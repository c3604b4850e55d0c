"""ASVD's fisher information of every target linear, by a layer-by-layer backward pass.

For each calibration window w, g_w = dL_w / dW is the gradient of the window's language-model
loss (mean next-token cross-entropy, the loss a causal LM computes with labels = its inputs)
with respect to a weight W (out x in). The statistic per input channel j is

    fisher_j = sqrt( (1 / N) sum_w sum_i g_w[i, j]^2 ),

the mean over windows of the squared per-window gradient (ASVD accumulates grad^2 after each
calibration sample's backward, batch size 1, and divides by the number of samples), summed over
output rows (ASVD takes their mean: a constant factor m, which no truncation sees), square-rooted.

Memory stays bounded as in the walk (utils.layerwise): a forward walk writes each decoder layer's
inputs to a temporary directory on disk (`scratch_dir`, default the system's temporary folder;
one file per layer, removed at the end), never holding more than one layer's in memory; then from
the top down, the head's gradient (utils.model.head_on_hidden: the model's own final norm and
lm_head) enters the last layer, and each layer in turn goes to the device, reads its inputs back
(memory-mapped), recomputes one window at a time with gradients, adds that window's squared weight
gradients, and hands the input gradient to the layer below. One layer, one window's activations
and the per-window output gradients of two layers (this one's, the one below's) are on the device
at a time; the disk holds every layer's inputs (layers x N x L x d in the model's dtype). A streamed
model (utils.model.LayerStream) has each layer read from its checkpoint when the backward reaches it
and put back on the meta device after, as the forward walk does: the host holds about one layer.
"""
from __future__ import annotations

import os
import tempfile

import torch
from torch import nn
from tqdm import tqdm

from utils.layerwise import LayerContext, call_layer, layer_on_device, walk_layers
from utils.model import (decoder_layers, head_on_hidden, layer_linear_units, layer_prefix, layer_stream,
                         target_linears)


def fisher_information(model: nn.Module, windows: torch.Tensor, device: torch.device | str,
                       offload: torch.device | str = "cpu", scratch_dir: str | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """Fisher vector (in,) float64 of every target linear, by qualified name, and a summary
    (windows, mean loss). windows: N x L token ids. scratch_dir: where the layers' inputs are
    kept meanwhile (a fresh directory inside it, removed at the end)."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model)
    num_windows = windows.shape[0]
    with tempfile.TemporaryDirectory(prefix="svd-fisher-", dir=scratch_dir) as scratch:
        def kept(index: int) -> str:
            return os.path.join(scratch, f"inputs_{index:04d}.pt")

        # forward: the inputs of every layer to disk, the call arguments (shared, small) in memory
        layer_args: list[tuple[tuple, dict]] = []
        final: dict[str, torch.Tensor] = {}

        def forward(context: LayerContext) -> torch.Tensor:
            torch.save(context.inputs.cpu(), kept(context.index))
            layer_args.append(context.layer_args)
            final["outputs"] = context.run()
            return final["outputs"]

        walk_layers(model, windows, device, forward, desc="fisher forward", offload=offload, changes_weights=False)
        # head: per-window gradient of the loss at the last layer's output
        outputs = final.pop("outputs")
        losses = []
        gradients = torch.empty_like(outputs)
        with head_on_hidden(model, device) as head:
            for w in tqdm(range(num_windows), desc="fisher head", leave=False):
                hidden = outputs[w:w + 1].detach().requires_grad_(True)
                ids = windows[w:w + 1].to(device)
                with torch.enable_grad():
                    loss = head(hidden, ids, labels=ids).loss
                    (gradients[w:w + 1],) = torch.autograd.grad(loss, [hidden])
                losses.append(float(loss.detach()))
        del outputs
        fisher: dict[str, torch.Tensor] = {}
        stream = layer_stream(model)
        for index in tqdm(reversed(range(len(layers))), total=len(layers), desc="fisher backward"):
            layer_inputs = torch.load(kept(index), mmap=True, weights_only=True)
            below = torch.empty(layer_inputs.shape, dtype=gradients.dtype, device=device) if index else None
            if stream is not None:  # a streamed model: the layer is read from disk now, put back on meta after
                stream.load(model, index)
            try:
                # device copies of the weights: their requires_grad is set here and dropped with them
                with layer_on_device(layers[index], device, offload) as layer:
                    linears = target_linears(layer)
                    sums = {name: torch.zeros(linear.in_features, dtype=torch.float64, device=device)
                            for name, linear in linears.items()}
                    for linear in linears.values():
                        linear.weight.requires_grad_(True)
                    weights = [linear.weight for linear in linears.values()]
                    for w in range(num_windows):
                        hidden = layer_inputs[w:w + 1].to(device).requires_grad_(index > 0)
                        with torch.enable_grad():
                            output = call_layer(layer, hidden, layer_args[index])
                            wanted = ([hidden] if index > 0 else []) + weights
                            grads = torch.autograd.grad(output, wanted, grad_outputs=gradients[w:w + 1])
                        if index > 0:
                            below[w:w + 1] = grads[0]
                        for name, grad in zip(linears, grads[1 if index > 0 else 0:]):
                            sums[name] += grad.to(torch.float64).square().sum(0)
                    # the weight copies share the loaded layer's storage: drop them before the next layer is read
                    layer = linears = weights = output = grads = hidden = None
            finally:
                if stream is not None:
                    stream.release(model, index)
            for name, total in sums.items():
                fisher[f"{prefix}.{index}.{name}"] = (total / num_windows).sqrt().cpu()
            gradients = below
            del layer_inputs
            os.remove(kept(index))
    fisher = {name: fisher[name] for name in layer_linear_units(model, (nn.Linear,))}  # layer order, as target_shapes
    summary = {"windows": int(num_windows), "seq_len": int(windows.shape[1]),
               "mean_loss": sum(losses) / len(losses) if losses else None,
               "definition": "sqrt(mean over windows of the squared per-window LM-loss gradient, summed over output rows)"}
    return fisher, summary
