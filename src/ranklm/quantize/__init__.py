"""Weight-only quantization of the compressed targets, and bytes (docs/design.md §11; issue 29).

``spec`` parses ``--quantize`` / ``--quant-group-size`` / ``--budget-bytes``; ``affine`` quantizes one
matrix with torchao's affine primitives into the stored ``QuantizedLinear`` (modeling_ranklm.py: the same
layer a checkpoint loads without ranklm); ``apply`` quantizes a model's targets, factored (both factors)
or dense; ``sizes`` counts bytes as stored and prices the joint allocator's options.
"""

from .spec import QuantSpec, parse_budget_bytes, parse_quantize
from .sizes import dense_bytes, factored_bytes, quantized_bytes, stored_target_bytes, model_stored_bytes

__all__ = ["QuantSpec", "dense_bytes", "factored_bytes", "model_stored_bytes", "parse_budget_bytes",
           "parse_quantize", "quantized_bytes", "stored_target_bytes"]
