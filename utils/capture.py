"""Seeing the inputs of a layer's modules: the one hook every pass, step 1's statistics and the
sensitivity pass record through (utils.layerwise builds the walk's helpers on it). Below
utils.layerwise and utils.stats, which both import it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class StopLayer(Exception):
    """Raised from a hook to end a layer's forward pass early (its remaining modules are not needed)."""


@contextmanager
def recording_inputs(modules: dict[str, nn.Module], record: Callable[[str, torch.Tensor], None],
                     stop_layer: nn.Module | None = None) -> Iterator[None]:
    """The one way a pass sees the inputs of a layer's modules: within the block, each call of one
    of `modules` first hands its input (the first positional argument, as the module receives it:
    on the device, in the layer's dtype, not copied) to record(name, x), before the module runs.
    stop_layer: the layer holding `modules`; each call of it ends (StopLayer, which feed_layer
    takes) once every one of `modules` has been called in it, before the last of them runs: the
    rest of the layer is not needed for their inputs. The hooks are removed when the block ends,
    also on an error."""
    called: set[str] = set()

    def new_call(_layer, _args) -> None:
        called.clear()

    def hook(name: str):
        def pre_hook(_module, args) -> None:
            record(name, args[0])
            if stop_layer is not None:
                called.add(name)
                if len(called) == len(modules):
                    raise StopLayer
        return pre_hook

    handles = []
    try:
        if stop_layer is not None:
            handles.append(stop_layer.register_forward_pre_hook(new_call))
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
