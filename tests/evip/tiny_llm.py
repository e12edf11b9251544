"""A tiny plain InternLM2 LLM saved as an HF folder (with its tokenizer), the starting point of S1.1 in tests."""

from __future__ import annotations

from pathlib import Path

from evip.data.synthetic import write_random_llm


def save_tiny_llm(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A random plain InternLM2 (D 64, F 96, 2 layers, GQA 4/2, context 1024) sized for ``tokenizer``."""
    return write_random_llm(folder, tokenizer, seed=seed, max_position_embeddings=1024)
