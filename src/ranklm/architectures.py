"""Which transformers class rebuilds a model from its config (shared by loading and checkpoints)."""

from __future__ import annotations

import transformers
from transformers import AutoModel, AutoModelForCausalLM


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


def has_lm_head(model) -> bool:
    """Whether ``model`` ends in an LM head (a causal LM), i.e. has an LM loss to evaluate or differentiate."""
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None
