"""A tiny plain InternLM2 LLM saved as an HF folder (with its tokenizer), the starting point of S1.1 in tests."""

from __future__ import annotations

from pathlib import Path

import torch

from mono.configuration import PLAIN_LLM_ARCHITECTURE, InternLM2Config
from mono.internlm2 import InternLM2ForCausalLM


def save_tiny_llm(folder: Path, tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a random plain InternLM2 (D 64, F 96, 2 layers, GQA 4/2) sized for ``tokenizer`` into ``folder``."""
    config = InternLM2Config(
        architectures=[PLAIN_LLM_ARCHITECTURE], vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
