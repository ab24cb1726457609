"""ranklm models inside the Hugging Face stack: transformers' loader, ``save_pretrained``, remote code.

``register()`` makes ``quant_method: "ranklm"`` known to transformers with ranklm's
``LowRankLinear`` (``import ranklm`` arranges it as soon as transformers is imported: see
``ranklm.transformers_hook``); ``attach(model)`` gives an in-memory compressed model the quantization config
and quantizer that ``save_pretrained``/``push_to_hub`` write and ``from_pretrained`` reads back;
``merge_and_unload(model)`` multiplies the factors back in memory (peft's name);
``remote_code(model)`` is the ``modeling_ranklm.py`` + ``auto_map`` a checkpoint carries for
processes without ranklm (``trust_remote_code=True``). The mechanics live in ``ranklm/modeling_ranklm.py``,
which has to stay self-contained because it is that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..modeling_ranklm import (
    DENSE,
    FORMAT_VERSION,
    MARKER_SUFFIX,
    QUANT_METHOD,
    QUANTIZED_FORMAT_VERSION,
    QuantizedLinear,
    RanklmHfQuantizer,
    RanklmQuantizationConfig,
    check_tensors,
    checkpoint_shapes,
    expected_tensors,
    install_layers,
    marker_tensors,
)
from ..modeling_ranklm import register as _register

REMOTE_FILE = "modeling_ranklm.py"
_AUTO_CLASSES = (  # (auto class, its mapping in transformers.models.auto.modeling_auto), most specific first
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def _low_rank_linear() -> type[nn.Module]:
    from ..layers import LowRankLinear

    return LowRankLinear


def register() -> None:
    """Make ``quant_method: "ranklm"`` loadable by transformers, with ranklm's ``LowRankLinear``
    (imported when a model loads, so this is safe to call while transformers is being imported)."""
    _register(_low_rank_linear)


def quantization_config(model: nn.Module) -> RanklmQuantizationConfig:
    """The ``quantization_config`` describing ``model``'s compression (its targets, their current ranks, and
    ``bits``/``group_size`` where a target is quantized: its factors, or its dense weight)."""
    from .._version import __version__
    from ..layers import LowRankLinear

    state = getattr(model, "ranklm", None)
    if state is None:
        raise ValueError("this model was not compressed by ranklm (it has no compression state)")
    modules: dict[str, dict[str, Any]] = {}
    for t in state.targets:
        module = model.get_submodule(t.name)
        factored = isinstance(module, LowRankLinear)
        bias = (module.A.bias if factored else getattr(module, "bias", None)) is not None
        info: dict[str, Any] = {"rank": int(module.rank) if factored else DENSE, "out": t.out_features,
                                "in": t.in_features, "kind": t.kind, "bias": bias, "block": t.block}
        quantized = [m for m in ((module.A, module.B) if factored else (module,)) if isinstance(m, QuantizedLinear)]
        if quantized:
            alike = len(quantized) == (2 if factored else 1) and len({(m.bits, m.group_size) for m in quantized}) == 1
            if not alike:
                raise ValueError(f"{t.name}: both factors must be quantized alike (bits and group size) to be saved")
            info.update(bits=int(quantized[0].bits), group_size=int(quantized[0].group_size))
        modules[t.name] = info
    return RanklmQuantizationConfig(modules=modules, ranklm_version=__version__)


def attach(model: nn.Module) -> nn.Module:
    """Give a compressed model the quantization config and quantizer transformers expects of a
    quantized model, so ``model.save_pretrained()`` and ``push_to_hub()`` write what
    ``from_pretrained`` needs (config + factors + rank markers); returns ``model``."""
    qc = quantization_config(model)  # the quantizer it looks up was registered when this module was imported
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    model.config.quantization_config = qc
    model.hf_quantizer = AUTO_QUANTIZER_MAPPING[QUANT_METHOD](qc, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
    model.is_quantized = False  # float factors: casting and training stay allowed
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove what ``attach`` (or a ranklm ``from_pretrained``) put on the model."""
    for owner, name in ((model, "hf_quantizer"), (model, "quantization_method"), (model.config, "quantization_config"),
                        (model.config, "auto_map")):
        if hasattr(owner, name):
            delattr(owner, name)
    model.is_quantized = False
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Multiply every factored layer back into a dense one (quantized ones dequantized first, into the
    model's float dtype), in memory, and drop the compression state: a plain transformers model (the
    in-memory twin of ``ranklm export --dense``)."""
    from ..layers import merge_low_rank

    merge_low_rank(model)
    detach(model)
    if hasattr(model, "ranklm"):
        del model.ranklm
    return model


def auto_class_name(model: nn.Module) -> str:
    """The transformers Auto class that maps the model's config type to its class (e.g. AutoModelForCausalLM)."""
    from transformers.models.auto import modeling_auto

    cls_name, model_type = type(model).__name__, getattr(model.config, "model_type", None)
    for auto, mapping_name in _AUTO_CLASSES:
        names = getattr(modeling_auto, mapping_name, {}).get(model_type)
        if cls_name == names or (isinstance(names, (tuple, list)) and cls_name in names):
            return auto
    return "AutoModel"


def remote_code(model: nn.Module) -> tuple[str, dict[str, str]]:
    """(source of ``modeling_ranklm.py``, the ``auto_map`` entry pointing at its class) for a checkpoint."""
    base, config_base = type(model).__name__, type(model.config).__name__
    source = (Path(__file__).parent.parent / REMOTE_FILE).read_text()  # ranklm/modeling_ranklm.py, copied as is
    cls, config_cls = f"Ranklm{base}", f"Ranklm{config_base}"
    source += (
        "\n\n# ---- written by ranklm.save for this checkpoint ----\n"
        f"from transformers import {base} as _RanklmBase  # noqa: E402\n"
        f"from transformers import {config_base} as _RanklmConfigBase  # noqa: E402\n\n"
        "register_remote()\n\n\n"
        f"class {config_cls}(_RanklmConfigBase):\n"
        f'    """{config_base} itself; loading it through AutoConfig imports this file, which registers the\n'
        '    ranklm quantization method before anything parses ``quantization_config`` (lm-eval does so first)."""\n\n\n'
        f"class {cls}(_RanklmBase):\n"
        f'    """{base} whose compressed projections the ranklm quantizer above builds as factored layers."""\n\n'
        f"    config_class = {config_cls}\n"
    )
    module = REMOTE_FILE[:-3]
    return source, {"AutoConfig": f"{module}.{config_cls}", auto_class_name(model): f"{module}.{cls}"}


register()  # importing this module may be what first imported transformers (see ranklm.transformers_hook)

__all__ = [
    "DENSE",
    "FORMAT_VERSION",
    "MARKER_SUFFIX",
    "QUANTIZED_FORMAT_VERSION",
    "QUANT_METHOD",
    "QuantizedLinear",
    "REMOTE_FILE",
    "RanklmHfQuantizer",
    "RanklmQuantizationConfig",
    "attach",
    "auto_class_name",
    "check_tensors",
    "checkpoint_shapes",
    "detach",
    "expected_tensors",
    "install_layers",
    "marker_tensors",
    "merge_and_unload",
    "quantization_config",
    "register",
    "remote_code",
]
