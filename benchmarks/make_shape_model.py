"""Write a randomly initialised model folder with a real model's shapes, for memory and speed checks.

No weights of Qwen2.5-0.5B exist offline here, so the memory check of issue 13 ("a Qwen2.5-0.5B-size
model compresses on this 24 GiB machine") runs on its architecture with random weights: statistics,
factorizations and the knapsack cost the same whatever the values. The vocabulary is the packaged
SmolLM2 tokenizer's (49,152 instead of Qwen's 151,936: only the embedding is smaller; every target
has Qwen2.5-0.5B's shape). Usage: python benchmarks/make_shape_model.py out/qwen2.5-0.5b-shape
"""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from ranklm.models import default_model_dir


def main(out: str) -> None:
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                      dtype="float32")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(Path(out))
    tok.save_pretrained(Path(out))
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/qwen2.5-0.5b-shape")
