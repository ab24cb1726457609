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

Quantized targets (weight-only, ``ranklm.quantize``; ``format_version`` 3): a factored target's ``A`` and
``B`` are ``QuantizedLinear`` (``<t>.A.qweight``/``scale``/``zero``, ``<t>.B.*``, ``<t>.A.bias``); a dense
target kept at full rank but quantized is one ``QuantizedLinear`` (``<t>.qweight``/``scale``/``zero``,
``<t>.bias``) and stores the same guard ``<t>.weight``, int32 [bits]. Every stored tensor of a quantized
layer is integer, so ``dtype=`` and ``.to(dtype)`` leave the codes alone.
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
FORMAT_VERSION = 2  # written when nothing is quantized, so such checkpoints stay readable by older ranklm
QUANTIZED_FORMAT_VERSION = 3  # written when any module carries "bits" (weight-only quantization)
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION)
BITS_RANGE = (2, 8)
DENSE = "dense"
MARKER_SUFFIX = ".weight"  # <target>.weight: int32 [rank], the guard described above
FACTOR_KEYS = ("A.weight", "B.weight")
KINDS = ("linear", "conv1d")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class RanklmQuantizationConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` for a ranklm checkpoint.

    ``modules``: every compression target, ``{name: {"rank": k | "dense", "out": o, "in": i,
    "kind": "linear" | "conv1d", "bias": bool, "block": b}}``, plus ``"bits"`` (2-8) and ``"group_size"``
    for a quantized target (its factors, or its dense weight); names as in the saved model.
    ``format_version``: 3 when any module is quantized, else 2 (the default picks it).
    """

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int | None = None,
                 ranklm_version: str | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.ranklm_version = ranklm_version
        self.modules = {str(k): dict(v) if isinstance(v, dict) else v for k, v in (modules or {}).items()}
        if format_version is None:
            quantized = any(isinstance(v, dict) and v.get("bits") is not None for v in self.modules.values())
            format_version = QUANTIZED_FORMAT_VERSION if quantized else FORMAT_VERSION
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        """One clear ValueError for a config that cannot describe a ranklm model."""
        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"ranklm quantization_config has format_version {self.format_version!r}; this code reads "
                             f"versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))} (upgrade ranklm, or re-save "
                             f"the checkpoint)")
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
            bits, group = info.get("bits"), info.get("group_size")
            if bits is None and group is None:
                continue
            if not (_is_int(bits) and BITS_RANGE[0] <= bits <= BITS_RANGE[1]):
                raise ValueError(f"ranklm quantization_config: bad bits {bits!r} for {name} (an integer "
                                 f"{BITS_RANGE[0]}-{BITS_RANGE[1]})")
            if not (_is_int(group) and group > 0):
                raise ValueError(f"ranklm quantization_config: bad group_size {group!r} for {name} (a positive "
                                 f"integer, given with bits)")
            if self.format_version < QUANTIZED_FORMAT_VERSION:
                raise ValueError(f"ranklm quantization_config: {name} is quantized, which format_version "
                                 f"{self.format_version} cannot describe (needs {QUANTIZED_FORMAT_VERSION})")

    def factored(self) -> dict[str, dict[str, Any]]:
        """Targets stored as two factors (float or quantized)."""
        return {n: i for n, i in self.modules.items() if i.get("rank") != DENSE}

    def quantized_dense(self) -> dict[str, dict[str, Any]]:
        """Targets kept at full rank whose weight is quantized (one ``QuantizedLinear``)."""
        return {n: i for n, i in self.modules.items() if i.get("rank") == DENSE and i.get("bits") is not None}

    def installed(self) -> dict[str, dict[str, Any]]:
        """Targets whose module the quantizer replaces (factored or quantized), each carrying a marker."""
        return {n: i for n, i in self.modules.items() if i.get("rank") != DENSE or i.get("bits") is not None}

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

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The dense module of the original type; quantized factors are dequantized first (into ``dtype``,
        default: the bias's dtype, else float32)."""
        with torch.no_grad():
            dtype = factor_dtype(self, dtype)
            w = factor_weight(self.A, dtype) @ factor_weight(self.B, dtype)
            return dense_module(w, self.A.bias, self.source_kind)


def factor_dtype(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.dtype:
    """The float dtype a layer's dense equivalent is built in: its float factors' dtype; for quantized
    factors ``dtype``, else the dtype of its bias, else float32."""
    if isinstance(getattr(layer.A, "weight", None), nn.Parameter):
        return layer.A.weight.dtype
    if dtype is not None:
        return dtype
    bias = getattr(layer.A, "bias", None)
    return bias.dtype if bias is not None else torch.float32


def factor_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A factor's weight (out x in): a float Linear's own, a ``QuantizedLinear``'s dequantized in ``dtype``."""
    if hasattr(linear, "qweight"):
        return linear.dequantized(dtype)
    return linear.weight


def dense_module(w: torch.Tensor, bias: torch.Tensor | None, source_kind: str) -> nn.Module:
    """``nn.Linear`` (``source_kind`` "linear") or GPT-2's ``Conv1D`` (in x out; always a bias) holding W (out x in)."""
    out, inp = w.shape
    with torch.no_grad():
        if source_kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(out, inp).to(device=w.device, dtype=w.dtype)
            conv.weight.copy_(w.t())
            conv.bias.copy_(bias if bias is not None else torch.zeros_like(conv.bias))
            return conv
        dense = nn.Linear(inp, out, bias=bias is not None, device=w.device, dtype=w.dtype)
        dense.weight.copy_(w)
        if bias is not None:
            dense.bias.copy_(bias)
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


def group_axis(in_features: int, out_features: int, group_size: int) -> str:
    """Which dimension of an out x in weight a ``QuantizedLinear`` groups: "in" if ``group_size`` divides it,
    else "out" if it divides that, else "in" (padded)."""
    if in_features % group_size and not out_features % group_size:
        return "out"
    return "in"


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with W (out x in) stored as ``bits``-bit integers in groups of ``group_size``:
    ``W = (q - zero) * scale`` per group (asymmetric affine, q in [-2^(bits-1), 2^(bits-1) - 1]).

    Groups run along the input when ``group_size`` divides ``in``, else along the output when it divides
    ``out``, else along the input with the last group padded (``group_axis``): a factor ``A`` (out x rank)
    is grouped along its output, so no rank pays for padding, and the decision needs only the shapes.
    Buffers (all integer, so no ``.to(dtype)``/``dtype=`` cast can alter them), with ``rows x cols`` = out x in
    (or in x out, i.e. W^T, along the output): ``qweight`` uint8, the codes ``q + 2^(bits-1)`` packed
    ``bits`` per value (``pack_bits``), ``rows x ceil(groups*group_size*bits/8)``; ``scale`` int16, the
    float16 scales' bits, ``rows x groups``; ``zero`` int8, ``rows x groups``; ``groups = ceil(cols / group_size)``.
    The forward dequantizes into the input's dtype and runs one GEMM; the unpacked codes are cached
    (one byte per weight), the stored bytes are what the checkpoint holds. ``source_kind``: the module a
    dense quantized target replaced ("linear" or "conv1d"), restored by ``to_dense``.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None, source_kind: str = "linear") -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.source_kind = source_kind
        for name, shape in self.buffer_shapes(in_features, out_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=self.BUFFER_DTYPES[name], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._codes: torch.Tensor | None = None
        self._codes_of: Any = None

    BUFFER_DTYPES = {"qweight": torch.uint8, "scale": torch.int16, "zero": torch.int8}

    @staticmethod
    def buffer_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, int]]:
        """Shapes of ``qweight``, ``scale`` and ``zero`` for an out x in matrix (what a checkpoint must hold)."""
        rows, cols = ((out_features, in_features) if group_axis(in_features, out_features, group_size) == "in"
                      else (in_features, out_features))
        groups = -(-cols // group_size)
        packed = -(-groups * group_size * bits // 8)
        return {"qweight": (rows, packed), "scale": (rows, groups), "zero": (rows, groups)}

    def codes(self) -> torch.Tensor:
        """Signed codes q (int8, out x groups*group_size), unpacked once per stored ``qweight``.

        The cache is keyed on the buffer object itself (kept referenced, so its address cannot be reused by
        another tensor), its data pointer, device and version: a load that assigns a new ``qweight``
        (``from_pretrained``, ``load_state_dict(assign=True)``, ``.to()``), an in-place ``copy_`` or a
        ``.data`` swap all unpack again."""
        q = self.qweight
        key = (q, q.data_ptr(), q.device, q._version)
        of = self._codes_of
        if self._codes is None or of is None or of[0] is not q or of[1:] != key[1:]:
            padded = self.scale.shape[1] * self.group_size
            u = unpack_bits(self.qweight, self.bits, padded)
            self._codes = (u.to(torch.int16) - (1 << (self.bits - 1))).to(torch.int8)
            self._codes_of = key
        return self._codes

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out x in) in ``dtype`` (float32 arithmetic, then cast)."""
        along_in = group_axis(self.in_features, self.out_features, self.group_size) == "in"
        w = affine_dequantize(self.codes(), self.scale.view(torch.float16), self.zero, self.group_size,
                              self.in_features if along_in else self.out_features)
        w = w if along_in else w.t()
        return w.to(dtype or (self.bias.dtype if self.bias is not None else torch.float32))

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The dequantized weight in the module it replaced (``nn.Linear`` or GPT-2's ``Conv1D``), in ``dtype``
        (default: the bias's dtype, else float32)."""
        with torch.no_grad():
            return dense_module(self.dequantized(dtype), self.bias, self.source_kind)

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


def expected_tensors(name: str, info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape a target the quantizer installs stores (factors, quantized or not; or a quantized
    dense weight), its marker left out."""
    out, inp, bits, group = info["out"], info["in"], info.get("bits"), info.get("group_size")
    k = info["rank"]
    expected: dict[str, tuple[int, ...]] = {}
    if k == DENSE:  # quantized dense: one QuantizedLinear
        expected.update({f"{name}.{b}": s for b, s in QuantizedLinear.buffer_shapes(inp, out, bits, group).items()})
        if info.get("bias"):
            expected[f"{name}.bias"] = (out,)
        return expected
    if bits is None:
        expected.update({f"{name}.A.weight": (out, k), f"{name}.B.weight": (k, inp)})
    else:
        for side, (i, o) in (("A", (k, out)), ("B", (inp, k))):
            expected.update({f"{name}.{side}.{b}": s for b, s in QuantizedLinear.buffer_shapes(i, o, bits, group).items()})
    if info.get("bias"):
        expected[f"{name}.A.bias"] = (out,)
    return expected


def check_tensors(config: RanklmQuantizationConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """The saved factors (and quantized codes, scales, zero points) have the shapes the config's ranks,
    bits and group sizes say; ValueError naming the first that does not."""
    for name, info in config.installed().items():
        what = f"rank {info['rank']}" if info["rank"] != DENSE else "the dense weight"
        if info.get("bits") is not None:
            what += f" at {info['bits']} bits, group size {info['group_size']},"
        for key, shape in expected_tensors(name, info).items():
            if key not in shapes:
                raise ValueError(f"ranklm checkpoint does not match its quantization_config: {key} is missing "
                                 f"from the weights")
            if tuple(shapes[key]) != shape:
                raise ValueError(f"ranklm checkpoint does not match its quantization_config: {key} is "
                                 f"{list(shapes[key])} in the weights, {what} of {name} needs {list(shape)}")


def install_layers(model: nn.Module, config: RanklmQuantizationConfig, layer_cls: type[nn.Module]) -> list[str]:
    """Swap every factored target of ``model`` for an empty ``layer_cls`` (with ``QuantizedLinear`` factors
    when the target is quantized) and every quantized dense target for an empty ``QuantizedLinear``, on the
    weight's device and dtype (the meta device inside ``from_pretrained``); names of the swapped modules in
    ``model``."""
    swapped = []
    for name, info in config.installed().items():
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
        bias, kind, bits, group = getattr(module, "bias", None) is not None, info.get("kind", "linear"), \
            info.get("bits"), info.get("group_size")
        if info["rank"] == DENSE:
            layer = QuantizedLinear(info["in"], info["out"], bits, group, bias, device=w.device, dtype=w.dtype,
                                    source_kind=kind)
        else:
            layer = layer_cls(info["in"], info["out"], info["rank"], bias, kind, device=w.device, dtype=w.dtype)
            if bits is not None:
                k = info["rank"]
                layer.B = QuantizedLinear(info["in"], k, bits, group, False, device=w.device, dtype=w.dtype)
                layer.A = QuantizedLinear(k, info["out"], bits, group, bias, device=w.device, dtype=w.dtype)
                layer.bits = bits
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
    """``<target>.weight`` -> int32 [rank] for every factored layer of ``model``, int32 [bits] for every
    quantized dense target (see the module docstring)."""
    markers = {f"{n}{MARKER_SUFFIX}": torch.tensor([int(m.rank)], dtype=torch.int32)
               for n, m in model.named_modules() if _is_factored(m)}
    markers.update({f"{n}{MARKER_SUFFIX}": torch.tensor([int(m.bits)], dtype=torch.int32)
                    for n in quantized_dense_names(model) for m in (model.get_submodule(n),)})
    return markers


def _is_factored(module: nn.Module) -> bool:
    return hasattr(module, "A") and hasattr(module, "B") and hasattr(module, "rank") and hasattr(module, "to_dense")


def _is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "qweight") and hasattr(module, "bits") and hasattr(module, "dequantized")


def quantized_dense_names(model: nn.Module) -> list[str]:
    """Names of the ``QuantizedLinear`` layers of ``model`` that are targets of their own (not a factor)."""
    factored = {n for n, m in model.named_modules() if _is_factored(m)}
    return [n for n, m in model.named_modules() if _is_quantized(m) and n.rpartition(".")[0] not in factored]


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
        swapped = install_layers(model, config, self.layer_cls)
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        for name in set(swapped) | set(config.installed()):
            ignore.add(rf"(^|\.){re.escape(name)}{re.escape(MARKER_SUFFIX)}$")
        model._keys_to_ignore_on_load_unexpected = ignore
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for module in model.modules():
            fast = getattr(module, "use_fast_layout_", None)
            if callable(fast) and isinstance(module.A, nn.Linear) and not module.A.weight.is_meta:
                fast()
        # Factors are float tensors: .half(), .to(dtype) and training work; quantized layers keep integer
        # buffers, which casts leave alone (only their biases follow), so the same holds for them.
        model.is_quantized = False
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
        """``model.dequantize()``: every factored layer multiplied back into its dense module, every quantized
        one dequantized into it (in ``dtype``)."""
        if isinstance(dtype, str):  # config.dtype may be a name
            dtype = getattr(torch, dtype.replace("torch.", ""), None)
        dtype = dtype if isinstance(dtype, torch.dtype) else None
        names = [n for n, m in model.named_modules() if _is_factored(m)] + quantized_dense_names(model)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            module = getattr(parent, child)
            setattr(parent, child, module.to_dense(dtype) if _takes_dtype(module) else module.to_dense())
        return model


def _takes_dtype(module: nn.Module) -> bool:
    import inspect

    return "dtype" in inspect.signature(module.to_dense).parameters


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
