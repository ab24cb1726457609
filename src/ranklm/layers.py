"""LowRankLinear and installing / merging it (docs/design.md §3).

``LowRankLinear`` is two GEMMs, ``x -> B -> A``, so the speed-up is real. It
replaces an ``nn.Linear`` or a GPT-2 ``Conv1D`` (same forward semantics:
``y = x W^T + b`` with W as out x in) and keeps the original's dtype, device and
``in_features``/``out_features``. ``source_kind`` remembers what it replaced so
a dense export can restore the exact original module type.

Memory layout: ``A.weight`` is an ``out x k`` parameter stored column-major (a
transposed view of a contiguous ``k x out`` tensor). ``F.linear`` then hands MKL a
row-major ``k x out`` operand, whose long rows stream at full memory bandwidth;
in the default layout each output is a dot product of only ``k`` numbers (on CPU,
svd-llm keep 0.5 decoded 1.12x faster than dense with it, 1.32-1.41x with this one:
benchmarks §3b). ``B`` (``k x in``, long rows already) stays row-major.
The layout survives ``copy_``, ``.to()`` and ``load_state_dict`` (a post-hook
restores it after ``assign=True`` loads); values and the saved format do not change.
"""

from __future__ import annotations

import torch
from torch import nn

from .targets import Conv1D, weight_matrix


def _restore_fast_layout(module: "LowRankLinear", _incompatible_keys: object) -> None:
    module.use_fast_layout_()


class LowRankLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        source_kind: str = "linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.source_kind = source_kind
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.use_fast_layout_()
        self.register_load_state_dict_post_hook(_restore_fast_layout)

    def use_fast_layout_(self) -> "LowRankLinear":
        """Store ``A.weight`` column-major (see the module docstring); a no-op when it already is."""
        if not isinstance(self.A, nn.Linear):  # quantized factors (ranklm.quantize): stored codes, no layout
            return self
        w = self.A.weight
        if w.dim() == 2 and w.stride() != (1, w.shape[0]):
            self.A.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, source={self.source_kind}"

    @classmethod
    def from_factors(cls, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> "LowRankLinear":
        """Build from ``A`` (out x k) and ``B`` (k x in), copying bias, dtype and device of ``module``."""
        w = weight_matrix(module)
        kind = "conv1d" if Conv1D and isinstance(module, Conv1D) else "linear"
        bias = getattr(module, "bias", None)
        layer = cls(
            int(w.shape[1]), int(w.shape[0]), int(a.shape[1]), bias is not None, kind, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            layer.A.weight.copy_(a.to(w.dtype))
            layer.B.weight.copy_(b.to(w.dtype))
            if bias is not None:
                layer.A.bias.copy_(bias)
        return layer

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The equivalent dense module of the original type (Linear or Conv1D). Quantized factors
        (``ranklm.quantize``) are dequantized first, into ``dtype`` (default: the bias's, else float32);
        float factors keep their own dtype."""
        from .modeling_ranklm import dense_module, factor_dtype, factor_weight

        with torch.no_grad():
            dtype = factor_dtype(self, dtype)
            w = factor_weight(self.A, dtype) @ factor_weight(self.B, dtype)  # out x in
            return dense_module(w, self.A.bias, self.source_kind)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is; an accelerate device hook (``device_map``) moves over with it,
    so the replacement runs on the device the old module ran on."""
    parent, child = get_submodule_parent(model, name)
    hook = getattr(getattr(parent, child), "_hf_hook", None)
    if hook is not None and getattr(new, "_hf_hook", None) is not hook:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    setattr(parent, child, new)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's float weights (the first floating parameter's), None when it has none."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def merge_low_rank(model: nn.Module) -> int:
    """Replace every LowRankLinear by its dense equivalent in place, and every quantized dense target
    (``QuantizedLinear``) by its dequantized Linear/Conv1D, quantized weights in the model's float dtype;
    returns how many."""
    from .modeling_ranklm import quantized_dense_names

    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)] + quantized_dense_names(model)
    dtype = _float_dtype(model)
    for n in names:
        replace_module(model, n, model.get_submodule(n).to_dense(dtype))
    return len(names)
