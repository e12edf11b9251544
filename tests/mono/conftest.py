"""Tiny model configs and a tiny word-level tokenizer, so model tests run in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mono import MonoInternVL, MonoInternVLConfig
from mono.tokenization import add_special_tokens

IMG_CONTEXT_ID = 100


def tiny_config(**llm_overrides) -> MonoInternVLConfig:
    llm = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
    )
    llm.update(llm_overrides)
    return MonoInternVLConfig(
        vision_config=dict(hidden_size=16, image_size=56, patch_size=14),
        llm_config=llm,
        force_image_size=56,
        img_context_token_id=IMG_CONTEXT_ID,
    )


def randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1; make them random so a mis-wired norm cannot pass unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("mlp1.0.weight"):
                p.uniform_(0.5, 1.5)


@pytest.fixture
def tiny_model() -> MonoInternVL:
    model = MonoInternVL(tiny_config()).eval()
    randomize_norms(model)
    return model


def image_prompt(num_tiles: int, tokens_per_tile: int, prefix: int = 5, suffix: int = 6, seed: int = 0) -> torch.Tensor:
    """``text <img> <IMG_CONTEXT> x n </img> text`` as ids (text ids < 96)."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(3, 96, (prefix,), generator=g)
    post = torch.randint(3, 96, (suffix,), generator=g)
    ctx = torch.full((num_tiles * tokens_per_tile,), IMG_CONTEXT_ID)
    return torch.cat([pre, torch.tensor([98]), ctx, torch.tensor([99]), post])[None]


WORDS = "what is in the image a cat dog red blue hello world how are you fine thanks one two three".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "\n"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return fast


def tiny_chat_model() -> tuple[MonoInternVL, PreTrainedTokenizerFast]:
    """A tiny model whose vocabulary is the tiny tokenizer's plus the nine special tokens."""
    tok = tiny_tokenizer()
    add_special_tokens(tok)
    config = tiny_config(vocab_size=len(tok))
    config.img_context_token_id = None
    model = MonoInternVL(config).eval()
    randomize_norms(model)
    return model, tok


@pytest.fixture
def auto_classes():
    """``mono.register_auto_classes()`` for one test, undone afterwards (it is process-wide)."""
    import mono
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    had = "internvl_chat" in CONFIG_MAPPING._extra_content
    mono.register_auto_classes()
    yield
    if not had:
        CONFIG_MAPPING._extra_content.pop("internvl_chat", None)
