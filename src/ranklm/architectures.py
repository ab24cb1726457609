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
