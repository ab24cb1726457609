"""Which transformers class rebuilds a model from its config, and what kind of model it is.

Shared by loading, checkpoints, the default-recipe choice and evaluation: a *causal* LM (next-token
head: perplexity, LM-loss statistics, the ``kfac-global`` default) versus everything else (encoders,
sequence classifiers and masked-LM heads such as ``BertForMaskedLM``, which predict masked tokens
and have no next-token loss).
"""

from __future__ import annotations

from functools import lru_cache

import transformers
from transformers import AutoModel, AutoModelForCausalLM

from .errors import RanklmError

# config attributes that hold the number of positions, in the order transformers' families use them
POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "max_seq_len", "seq_length")
# families whose learned positions start after the padding index (RoBERTa-style): padding_idx + 1 fewer usable
PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                                      "roberta-prelayernorm", "xmod", "longformer"})
MASKED_LM_SUFFIXES = ("ForMaskedLM", "ForPreTraining")


def model_class_for(config) -> type:
    """The class named in ``config.architectures`` if transformers has it, else a sensible Auto class."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
        return AutoModelForCausalLM
    except KeyError:
        return AutoModel


@lru_cache(maxsize=1)
def _head_class_names() -> tuple[frozenset[str], frozenset[str]]:
    """(causal-LM class names, masked-LM class names) from transformers' Auto mappings."""
    from transformers.models.auto import modeling_auto

    def names(mapping) -> set[str]:
        out: set[str] = set()
        for v in mapping.values():
            out.update(v if isinstance(v, (tuple, list)) else [v])
        return out

    causal = names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    masked = names(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | names(
        getattr(modeling_auto, "MODEL_FOR_PRETRAINING_MAPPING_NAMES", {}))
    return frozenset(causal), frozenset(masked - causal)


def is_causal_lm_class_name(name: str) -> bool:
    causal, masked = _head_class_names()
    if name in causal:
        return True
    if name in masked or name.endswith(MASKED_LM_SUFFIXES):
        return False
    return "ForCausalLM" in name or "LMHeadModel" in name


def is_masked_lm(model) -> bool:
    """Whether ``model``'s output head predicts masked tokens (``BertForMaskedLM``, ``*ForPreTraining``), not the next one."""
    name = type(model).__name__
    causal, masked = _head_class_names()
    return name not in causal and (name in masked or name.endswith(MASKED_LM_SUFFIXES))


def is_causal_lm(model) -> bool:
    """Whether ``model`` ends in a next-token LM head: perplexity, an LM loss to differentiate, ``kfac-global``.

    False for models without an output head (encoders, classifiers), for masked-LM heads
    (``BertForMaskedLM``: its logits at position t predict token t, not t+1) and for
    encoder-decoder models (their LM head sits behind a decoder fed separately).
    """
    get = getattr(model, "get_output_embeddings", None)
    if not (callable(get) and get() is not None):
        return False
    if is_masked_lm(model):
        return False
    return not bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def has_lm_head(model) -> bool:
    """Whether ``model`` ends in a *causal* LM head (``is_causal_lm``); masked-LM heads do not count."""
    return is_causal_lm(model)


def not_causal_reason(model) -> str:
    """Why ``model`` is not a causal LM, as a clause for an error message ("" when it is one)."""
    name = type(model).__name__
    if is_causal_lm(model):
        return ""
    if is_masked_lm(model):
        return f"{name} has a masked-LM head (it predicts masked tokens, not the next token)"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    return f"{name} has no LM head (an encoder?)"


def is_causal_lm_config(config) -> bool:
    """``is_causal_lm`` from a config alone (before loading weights): the class ``model_class_for`` would build."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(is_causal_lm_class_name(a) for a in archs)
    return type(config) in AutoModelForCausalLM._model_mapping


def max_positions(config) -> int | None:
    """The longest window (tokens) the model has positions for, or None when the config sets no limit.

    Reads ``max_position_embeddings`` (Llama, OPT, BERT, ...), ``n_positions``/``n_ctx`` (GPT-2) and
    a few rarer names, in a multimodal config's ``text_config`` too; RoBERTa-style learned positions
    lose ``pad_token_id + 1`` of theirs to the padding offset.
    """
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for attr in POSITION_ATTRS:
            value = getattr(cfg, attr, None)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                continue
            if getattr(cfg, "model_type", None) in PADDING_OFFSET_POSITIONS:
                pad = getattr(cfg, "pad_token_id", None)
                if isinstance(pad, int) and 0 <= pad < value - 1:
                    value -= pad + 1
            return int(value)
    return None


def check_positions(model, lengths: dict[str, int | None]) -> None:
    """Refuse a window length the model has no positions for (before any statistics or evaluation)."""
    limit = max_positions(model.config)
    if limit is None:
        return
    for flag, n in lengths.items():
        if n is not None and n > limit:
            raise RanklmError(f"{flag} {n} is longer than the {limit} positions {type(model).__name__} has "
                              f"(max_position_embeddings): use {flag} {limit} or less")
