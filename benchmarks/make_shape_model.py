"""Write a randomly initialised model folder with a real model's shapes, for memory and speed checks.

No weights of Qwen2.5-0.5B or Llama-3.2-1B exist offline here, so the memory checks (issue 13: "a
Qwen2.5-0.5B-size model compresses on this 24 GiB machine"; issue 26: "a Llama-3.2-1B-shaped bf16 model
compresses in 8 GiB") run on their architectures with random weights: statistics, factorizations and the
knapsack cost the same whatever the values. The vocabulary is the packaged SmolLM2 tokenizer's (49,152
instead of 151,936 / 128,256: only the embedding is smaller; every target has the real model's shape).

Usage: python benchmarks/make_shape_model.py OUT [qwen2.5-0.5b | llama-3.2-1b]
  qwen2.5-0.5b (default): hidden 896, MLP 4864, 24 layers, 14/2 heads, float32 (402 M parameters)
  llama-3.2-1b: hidden 2048, MLP 8192, 16 layers, 32/8 heads, bfloat16 (1.07 B parameters)
"""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ranklm.models import default_model_dir


def build(shape: str, vocab: int) -> torch.nn.Module:
    if shape == "qwen2.5-0.5b":
        cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096,
                          tie_word_embeddings=True, dtype="float32")
        return Qwen2ForCausalLM(cfg).eval()
    if shape == "llama-3.2-1b":
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, vocab_size=vocab, max_position_embeddings=4096,
                          rope_theta=500000.0, tie_word_embeddings=True, dtype="bfloat16")
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    raise SystemExit(f"unknown shape {shape!r}: qwen2.5-0.5b or llama-3.2-1b")


def main(out: str, shape: str = "qwen2.5-0.5b") -> None:
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    model = build(shape, len(tok))
    model.save_pretrained(Path(out))
    tok.save_pretrained(Path(out))
    print(f"{out}: {shape}, {sum(p.numel() for p in model.parameters()):,} parameters, {next(model.parameters()).dtype}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/qwen2.5-0.5b-shape", *(sys.argv[2:3]))
