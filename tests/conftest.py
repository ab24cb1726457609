"""Tiny random models of every supported family, a tiny tokenizer and text files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
VOCAB = 300

TEXT = (
    "The committee met in the morning to discuss the budget for the coming year. "
    "Members argued about schools, roads and hospitals, and about the price of bread. "
    "In the afternoon the chairman read a long letter from the mayor, who asked for patience. "
    "Nobody agreed on anything, but everybody promised to return the next day with better numbers. "
)


def make_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":  # GQA: 4 query heads, 2 KV heads
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
        return LlamaForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=256)
        return GPT2LMHeadModel(cfg).eval()
    if family == "opt":
        cfg = OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                        word_embed_proj_dim=64, max_position_embeddings=256)
        return OPTForCausalLM(cfg).eval()
    if family == "bert":
        cfg = BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB, max_position_embeddings=256)
        return BertModel(cfg).eval()
    raise ValueError(family)


FAMILIES = ["llama", "gpt2", "opt", "bert"]


def random_ids(n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq), generator=g)


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: no download, real tokenization."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama (GQA) folder with tokenizer, as a user's local HF model would be."""
    d = tmp_path_factory.mktemp("models") / "tiny-llama"
    model = make_model("llama")
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture()
def text_file(tmp_path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text("\n\n".join(TEXT for _ in range(60)))
    return p


def edit_compression(ckpt, edit):
    """Apply ``edit`` to a checkpoint's ranklm.json and mirror the rank map and shapes into config.json's
    quantization_config (the two records of the compression), as a hand-edited or damaged checkpoint would."""
    import json as _json

    meta = _json.loads((ckpt / "ranklm.json").read_text())
    edit(meta)
    (ckpt / "ranklm.json").write_text(_json.dumps(meta))
    config = _json.loads((ckpt / "config.json").read_text())
    old = config["quantization_config"]["modules"]
    modules = {}
    for name, rank in meta["rank_map"].items():
        info = meta["modules"].get(name)
        if not isinstance(info, dict):
            continue
        modules[name] = {**old.get(name, {"bias": False, "block": -1}), **info, "rank": rank}
    config["quantization_config"]["modules"] = modules
    (ckpt / "config.json").write_text(_json.dumps(config))
