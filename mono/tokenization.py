"""Tokenizer loading and the nine Mono-InternVL special tokens.

The release appends `<img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box>` to the InternLM2
vocabulary in that order (SPEC §4). The model routes positions whose id is `<IMG_CONTEXT>` to the visual
expert, so each of these must be a single, never-split token with an id inside the embedding table.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "add_special_tokens", "check_tokenizer", "load_tokenizer", "train_bpe_tokenizer"]

SPECIAL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


def _has_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    # get_vocab() covers both the base vocabulary and added tokens; convert_tokens_to_ids alone cannot tell
    # a missing token from one that maps to unk (it returns unk_token_id, or None without an unk token).
    return token in tokenizer.get_vocab()


def add_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Add the missing Mono-InternVL special tokens to `tokenizer` in SPEC order; return those added.

    Tokens are registered as special (extra) tokens: they are never split, get consecutive ids after the
    current vocabulary, and are dropped by `decode(..., skip_special_tokens=True)`. Tokens already present
    keep their ids. Remember to resize the model's embeddings if the returned list is not empty.
    """
    missing = [token for token in SPECIAL_TOKENS if not _has_token(tokenizer, token)]
    if not missing:
        return []
    # transformers 5 renamed the list key and its flag ("additional_*" -> "extra_*"); pick what this version
    # takes so the existing special tokens are extended, not replaced.
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    else:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_additional_special_tokens=False
        )
    still_missing = [token for token in missing if not _has_token(tokenizer, token)]
    if still_missing:
        raise ValueError(
            f"{type(tokenizer).__name__} refused to add the special tokens {still_missing}; "
            "add them to the tokenizer files (added_tokens.json) by hand"
        )
    return missing


def load_tokenizer(
    path: Union[str, os.PathLike],
    add_missing_special_tokens: bool = True,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder or a local `.gguf` file, never from the network.

    With `add_missing_special_tokens` (default) the nine Mono-InternVL tokens are added when absent.
    `trust_remote_code` is passed through for checkpoints whose tokenizer class lives in the folder (the
    release's InternLM2 tokenizer).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is a file other than a `.gguf` file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path '{path}' does not exist; pass a checkpoint folder or a .gguf file")
    if path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code, **_folder_config(path)
        )
    elif path.suffix.lower() == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=trust_remote_code
        )
    else:
        raise ValueError(
            f"tokenizer path '{path}' is a file but not a .gguf file; pass the folder holding the tokenizer files"
        )
    if add_missing_special_tokens:
        add_special_tokens(tokenizer)
    return tokenizer


def _folder_config(folder: Path) -> dict:
    """``{"config": ...}`` for a Mono-InternVL folder, else ``{}``.

    AutoTokenizer reads the folder's config.json through AutoConfig, which does not know ``internvl_chat`` (this
    package leaves it to remote code, see :func:`mono.register_auto_classes`) and warned on every load that the
    config is of another model type; handing it the parsed config avoids that."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return {}
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return {}  # AutoTokenizer reports a broken config.json itself
    if model_type != "internvl_chat":
        return {}
    from .configuration import MonoInternVLConfig

    return {"config": MonoInternVLConfig.from_pretrained(str(folder))}


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: Optional[int] = None) -> None:
    """Check that every Mono-InternVL special token is a single usable token.

    Each of the nine tokens must be in the vocabulary, map to an id other than the unk id, encode to its own
    id (not be split into pieces) and, when `vocab_size` (the model's embedding rows) is given, have an id
    below it.

    Raises:
        ValueError: naming the first offending token and what to do.
    """
    vocab = tokenizer.get_vocab()
    unk_id = tokenizer.unk_token_id
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            raise ValueError(
                f"special token {token!r} is missing from the tokenizer; call add_special_tokens(tokenizer)"
            )
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (unk_id is not None and token_id == unk_id):
            raise ValueError(f"special token {token!r} maps to the unk id {unk_id}; re-add it as a special token")
        # A token present in the vocab but not registered as an added token would be split by the
        # pre-tokenizer, and its positions would silently miss the visual expert.
        if token_id not in tokenizer.encode(token, add_special_tokens=False):
            raise ValueError(
                f"special token {token!r} (id {token_id}) is split when encoded; register it as an added "
                "special token"
            )
        if vocab_size is not None and token_id >= vocab_size:
            raise ValueError(
                f"special token {token!r} has id {token_id} but the model has only {vocab_size} embedding rows; "
                "resize the model's token embeddings to len(tokenizer)"
            )


def left_padded(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict:
    """Tokenize ``texts`` into one left-padded batch (``input_ids``, ``attention_mask`` tensors).

    The tokenizer is left as it was: the padding side is restored, and a tokenizer without a pad token pads with
    its end-of-sequence token for this call only (padded positions are masked, so the id never matters).
    """
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None and len(texts) > 1:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token to pad a batch with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
    finally:
        tokenizer.padding_side = side
        if pad is None and len(texts) > 1:
            tokenizer.pad_token = None
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def train_bpe_tokenizer(corpus: Sequence[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on ``corpus`` (deterministic; handles any text).

    Laid out like the chat LLMs this project converts: ``<s>`` is added as BOS by the post-processor (as
    InternLM2's tokenizer does), ``</s>`` is EOS, ``<pad>`` pads, ``<|im_start|>``/``<|im_end|>`` are special tokens
    for the chat templates, and the nine Mono-InternVL tokens follow. Offsets are left untrimmed, so label masking
    by character spans works. For tests, demos and benchmarks that need a real tokenizer without downloads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [corpus] if isinstance(corpus, str) else list(corpus)
    if not texts or not any(texts):
        raise ValueError("train_bpe_tokenizer needs a non-empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)
    add_special_tokens(fast)
    return fast
