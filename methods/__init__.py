"""Methods are passes over the layer walk (utils.layerwise.walk_layers), each in its own module.

A pass is a callable taking a LayerContext, with two class attributes the walk reads:
needs_activations (the calibration windows flow through the walk) and needs_reference (the
original model's stream is carried beside the compressed one), and optionally a third,
reads_original_weights (the layer's dense weights, which the decomposition replaced, are kept for it
in context.scratch; without such a pass they are let go as soon as replaced). Each is configured by a small
options dataclass; none knows argparse or model families. The methods of steps 2, 3 and 8 also declare
their flags and checks next to their options (methods.method), and what they make: a step 3 method its
pass, a step 2 method its plan; methods.registry composes them for the CLI (compress.py) and for
pipeline.steps.compress_model.
"""
from methods.anchored import AnchoredOptions, AnchoredUpdate
from methods.closed_form import ClosedFormUpdate, UpdateOptions
from methods.decompose import Decompose, DecomposeOptions
from methods.quantize import Quantize, QuantizeError, QuantizeOptions
from methods.refine import Refine, RefineOptions

__all__ = ["AnchoredOptions", "AnchoredUpdate", "Refine", "RefineOptions", "ClosedFormUpdate", "Decompose", "DecomposeOptions", "Quantize", "QuantizeError", "QuantizeOptions",
           "UpdateOptions"]
