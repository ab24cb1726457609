"""ranklm checkpoints in transformers' own loader: a ``quant_method: "ranklm"`` quantization config and quantizer.

Self-contained on purpose (torch, transformers and safetensors only): ``ranklm.save`` copies this
file into every checkpoint as ``modeling_ranklm.py``, so a process without ranklm loads the
checkpoint correctly with ``trust_remote_code=True`` (lm-eval, plain transformers scripts), while
``import ranklm`` registers the same quantizer with ranklm's own ``LowRankLinear``. The schema is
documented in docs/checkpoint-format.md.

Why a quantizer: transformers builds the model skeleton on the meta device and then asks a
registered ``HfQuantizer`` (``register_quantizer``, as compressed-tensors and torchao do) to swap
modules before any weight is read; that is exactly where the factored layers must appear, so
``device_map``, ``dtype``, offload, sharded checkpoints, ``save_pretrained`` and ``push_to_hub``
all work as for any quantized model. Why a marker: transformers skips an unknown
``quant_method`` with a warning and would fill the missing dense weights with random values, so
every factored target also stores ``<target>.weight`` as a one-element int32 tensor holding its
rank. Loaded by this quantizer the marker is ignored; loaded without it, its shape ([1] instead of
[out, in]) makes transformers stop with a size-mismatch error: never silently random layers.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "ranklm"
FORMAT_VERSION = 2
DENSE = "dense"
MARKER_SUFFIX = ".weight"  # <target>.weight: int32 [rank], the guard described above
FACTOR_KEYS = ("A.weight", "B.weight")
KINDS = ("linear", "conv1d")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class RanklmQuantizationConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` for a ranklm checkpoint.

    ``modules``: every compression target, ``{name: {"rank": k | "dense", "out": o, "in": i,
    "kind": "linear" | "conv1d", "bias": bool, "block": b}}``; names as in the saved model.
    """

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 ranklm_version: str | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.ranklm_version = ranklm_version
        self.modules = {str(k): dict(v) if isinstance(v, dict) else v for k, v in (modules or {}).items()}
        self.post_init()

    def post_init(self) -> None:
        """One clear ValueError for a config that cannot describe a ranklm model."""
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"ranklm quantization_config has format_version {self.format_version!r}; this code reads "
                             f"version {FORMAT_VERSION} (upgrade ranklm, or re-save the checkpoint)")
        if not self.modules:
            raise ValueError("ranklm quantization_config lists no modules")
        for name, info in self.modules.items():
            ok = (isinstance(info, dict) and _is_int(info.get("out")) and _is_int(info.get("in"))
                  and info["out"] > 0 and info["in"] > 0 and info.get("kind", "linear") in KINDS)
            if not ok:
                raise ValueError(f"ranklm quantization_config: bad entry for {name}: {info!r}")
            rank = info.get("rank")
            if rank != DENSE and not (_is_int(rank) and 0 < rank <= min(info["out"], info["in"])):
                raise ValueError(f"ranklm quantization_config: bad rank {rank!r} for {name} "
                                 f"({info['out']} x {info['in']})")

    def factored(self) -> dict[str, dict[str, Any]]:
        return {n: i for n, i in self.modules.items() if i.get("rank") != DENSE}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "ranklm_version": self.ranklm_version, "modules": self.modules}


class FactoredLinear(nn.Module):
    """``y = A(B(x))``: the layer used when ranklm is not installed (same parameter names as
    ``ranklm.layers.LowRankLinear``: ``B.weight`` k x in, ``A.weight`` out x k, ``A.bias``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, source_kind: str = "linear",
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank, self.source_kind = in_features, out_features, rank, source_kind
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def to_dense(self) -> nn.Module:
        with torch.no_grad():
            w = self.A.weight @ self.B.weight
            dense = nn.Linear(self.in_features, self.out_features, bias=self.A.bias is not None,
                              device=w.device, dtype=w.dtype)
            dense.weight.copy_(w)
            if self.A.bias is not None:
                dense.bias.copy_(self.A.bias)
        if self.source_kind == "conv1d":  # GPT-2's Conv1D stores in x out
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                conv.weight.copy_(w.t())
                conv.bias.copy_(dense.bias if dense.bias is not None else torch.zeros_like(conv.bias))
            return conv
        return dense


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes (uint8, rows x cols, values < 2**bits) -> uint8 rows x ceil(cols*bits/8),
    least significant bit first: the stored form of a quantized weight."""
    rows, cols = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    bit = (codes.to(torch.uint8).unsqueeze(-1) >> shifts) & 1  # rows x cols x bits
    flat = bit.reshape(rows, cols * bits)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(rows, pad)], dim=1)
    weights = (torch.ones(8, dtype=torch.uint8, device=codes.device) << torch.arange(8, dtype=torch.uint8,
                                                                                      device=codes.device))
    return (flat.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 codes, rows x cols."""
    if bits == 8:
        return packed[:, :cols]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bit = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)[:, :cols * bits]
    weights = torch.ones(bits, dtype=torch.uint8, device=packed.device) << torch.arange(bits, dtype=torch.uint8,
                                                                                        device=packed.device)
    return (bit.reshape(packed.shape[0], cols, bits) * weights).sum(-1, dtype=torch.uint8)


def affine_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      in_features: int) -> torch.Tensor:
    """``(q - zero) * scale`` per group in float32, padding dropped: out x in_features."""
    out = codes.shape[0]
    q = codes.to(torch.float32).reshape(out, -1, group_size)
    w = (q - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)
    return w.reshape(out, -1)[:, :in_features]


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with W (out x in) stored as ``bits``-bit integers in groups of ``group_size`` along
    the input: ``W = (q - zero) * scale`` per group (asymmetric affine, q in [-2^(bits-1), 2^(bits-1) - 1]).

    Buffers (all integer, so no ``.to(dtype)``/``dtype=`` cast can alter them): ``qweight`` uint8, the codes
    ``q + 2^(bits-1)`` packed ``bits`` per value (``pack_bits``), ``out x ceil(groups*group_size*bits/8)``;
    ``scale`` int16, the float16 scales' bits, ``out x groups``; ``zero`` int8, ``out x groups``.
    ``groups = ceil(in / group_size)``: a last partial group is padded (a factor's rank need not be a multiple).
    The forward dequantizes into the input's dtype and runs one GEMM; the unpacked codes are cached
    (one byte per weight), the stored bytes are what the checkpoint holds.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = -(-in_features // group_size)
        cols = -(-groups * group_size * bits // 8)
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=torch.int16, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.int8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._codes: torch.Tensor | None = None
        self._codes_of: Any = None

    def codes(self) -> torch.Tensor:
        """Signed codes q (int8, out x groups*group_size), unpacked once per stored ``qweight``."""
        key = (self.qweight.data_ptr(), self.qweight.device, self.qweight._version)
        if self._codes is None or self._codes_of != key:
            padded = self.scale.shape[1] * self.group_size
            u = unpack_bits(self.qweight, self.bits, padded)
            self._codes = (u.to(torch.int16) - (1 << (self.bits - 1))).to(torch.int8)
            self._codes_of = key
        return self._codes

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out x in) in ``dtype`` (float32 arithmetic, then cast)."""
        w = affine_dequantize(self.codes(), self.scale.view(torch.float16), self.zero, self.group_size,
                              self.in_features)
        return w.to(dtype or (self.bias.dtype if self.bias is not None else torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only view of what the forward uses)."""
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


def _weight_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear or GPT-2 Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight"):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return None


def resolve_name(model: nn.Module, name: str) -> str | None:
    """``name`` (as saved) in ``model``: as is, without the base-model prefix (a causal LM's
    checkpoint loaded as its base model), or with it (the reverse); None when it is not there."""
    names = dict(model.named_modules())
    if name in names:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in names:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    return None


def checkpoint_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            continue
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():
                shapes[k] = tuple(handle.get_slice(k).get_shape())
    return shapes


def check_tensors(config: RanklmQuantizationConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """The saved factors have the shapes the config's ranks say; ValueError naming the first that does not."""
    for name, info in config.factored().items():
        k, out, inp = info["rank"], info["out"], info["in"]
        expected = {f"{name}.A.weight": (out, k), f"{name}.B.weight": (k, inp)}
        if info.get("bias"):
            expected[f"{name}.A.bias"] = (out,)
        for key, shape in expected.items():
            if key not in shapes:
                raise ValueError(f"ranklm checkpoint does not match its quantization_config: {key} is missing "
                                 f"from the weights")
            if tuple(shapes[key]) != shape:
                raise ValueError(f"ranklm checkpoint does not match its quantization_config: {key} is "
                                 f"{list(shapes[key])} in the weights, rank {k} of {name} needs {list(shape)}")


def install_factored(model: nn.Module, config: RanklmQuantizationConfig, layer_cls: type[nn.Module]) -> list[str]:
    """Swap every factored target of ``model`` for an empty ``layer_cls`` (on the weight's device and
    dtype, the meta device inside ``from_pretrained``); names of the swapped modules in ``model``."""
    swapped = []
    for name, info in config.factored().items():
        here = resolve_name(model, name)
        if here is None:
            raise ValueError(f"ranklm rank map (quantization_config) does not fit the model: it names {name}, which "
                             f"{type(model).__name__} does not have")
        module = model.get_submodule(here)
        shape = _weight_shape(module)
        if shape is None:
            raise ValueError(f"ranklm rank map (quantization_config) does not fit the model: {name} is a "
                             f"{type(module).__name__}, not a linear layer")
        if shape != (info["out"], info["in"]):
            raise ValueError(f"ranklm rank map (quantization_config) does not fit the model: {name} is {list(shape)} in the "
                             f"model but {[info['out'], info['in']]} in the config")
        w = module.weight
        layer = layer_cls(info["in"], info["out"], info["rank"], getattr(module, "bias", None) is not None,
                          info.get("kind", "linear"), device=w.device, dtype=w.dtype)
        parent_name, _, child = here.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        if parent is not model and not any(True for _ in parent.parameters(recurse=False)) \
                and not any(True for _ in parent.buffers(recurse=False)):
            # A model's _init_weights may reach into the parent's children by name (GPT-2 rescales
            # ``c_proj.weight``, which a factored layer does not have); the parent owns nothing
            # itself, and its children are initialised (or loaded) on their own.
            parent._is_hf_initialized = True
        swapped.append(here)
    return swapped


def marker_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<target>.weight`` -> int32 [rank] for every factored layer of ``model`` (see the module docstring)."""
    return {f"{n}{MARKER_SUFFIX}": torch.tensor([int(m.rank)], dtype=torch.int32)
            for n, m in model.named_modules() if _is_factored(m)}


def _is_factored(module: nn.Module) -> bool:
    return hasattr(module, "A") and hasattr(module, "B") and hasattr(module, "rank") and hasattr(module, "to_dense")


class RanklmHfQuantizer(HfQuantizer):
    """Builds factored layers where ``quantization_config.modules`` says, before transformers loads weights."""

    requires_calibration = True  # a ranklm model is compressed by ranklm, never on the fly while loading
    layer_cls: type[nn.Module] = FactoredLinear

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        config = self.quantization_config
        if isinstance(config, dict):
            config = RanklmQuantizationConfig.from_dict(config)
            self.quantization_config = config
        if checkpoint_files:
            check_tensors(config, checkpoint_shapes(list(checkpoint_files)))
        swapped = install_factored(model, config, self.layer_cls)
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        for name in set(swapped) | set(config.factored()):
            ignore.add(rf"(^|\.){re.escape(name)}{re.escape(MARKER_SUFFIX)}$")
        model._keys_to_ignore_on_load_unexpected = ignore
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for module in model.modules():
            fast = getattr(module, "use_fast_layout_", None)
            if callable(fast) and not module.A.weight.is_meta:
                fast()
        model.is_quantized = False  # the factors are float tensors: .half(), .to(dtype) and training work
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        state = dict(model.state_dict())
        state.update(marker_tensors(model))
        return state, {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every factored layer multiplied back into its dense module."""
        for name in [n for n, m in model.named_modules() if _is_factored(m)]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, getattr(parent, child).to_dense())
        return model


def register(layer_loader: Any = None) -> None:
    """Register ``quant_method: "ranklm"`` with transformers, once per process.

    ``layer_loader``: a callable returning the layer class, called when a model loads (so
    registering imports nothing more); the first registration wins, ranklm's when ranklm is imported.
    """
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RanklmQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        cls = RanklmHfQuantizer
        if layer_loader is not None:
            cls = type("RanklmHfQuantizer", (RanklmHfQuantizer,), {"layer_cls": property(lambda self: layer_loader())})
        register_quantizer(QUANT_METHOD)(cls)


register_remote = register  # what the copy in a checkpoint calls on import (below the marker line)
