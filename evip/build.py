"""The model and tokenizer a stage starts from.

- a stage whose init is ``llm`` (S1.1) converts a plain LLM (InternLM2 or Llama-family folder, or a ``.gguf``
  file) with :meth:`mono.MonoInternVL.from_llm`: visual experts start as copies of each layer's text FFN, the
  patch embedding and projector are new (seeded), and the nine special tokens are added to the tokenizer;
- a stage whose init is ``previous`` loads a Mono-InternVL folder in the release layout (the previous stage's
  export, or a released checkpoint);
- ``model.config`` builds random weights from a Mono-InternVL ``config.json`` (benchmarks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mono import MonoInternVL, MonoInternVLConfig
from mono.tokenization import check_tokenizer, load_tokenizer

from .job import JobConfig

__all__ = ["build_model"]


def _is_mono_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "internvl_chat"
    except json.JSONDecodeError:
        return False


def build_model(job: JobConfig) -> tuple[MonoInternVL, object]:
    """``(model, tokenizer)`` for ``job`` on the CPU in float32 (the trainer moves, shards and casts it)."""
    cfg = job.model
    if cfg.config is not None:
        if cfg.tokenizer is None:
            raise ValueError("model.config builds random weights and needs model.tokenizer (a tokenizer folder)")
        config = MonoInternVLConfig.from_json_file(str(cfg.config))
        torch.manual_seed(job.seed)
        model = MonoInternVL(config)
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        if cfg.init is None:
            raise ValueError(
                f"stage {job.stage}: set model.init (a plain LLM for init 'llm', a Mono-InternVL folder otherwise), "
                "or model.config for random weights"
            )
        init = Path(cfg.init)
        if not init.exists():
            raise FileNotFoundError(f"model.init: {init} does not exist")
        tokenizer = load_tokenizer(cfg.tokenizer or init)
        if _is_mono_folder(init):
            model = MonoInternVL.from_pretrained(init, dtype=torch.float32)
        elif job.spec.init == "llm":
            model = MonoInternVL.from_llm(
                str(init),
                tokenizer=tokenizer,
                vision_hidden_size=cfg.vision_hidden_size,
                image_size=cfg.image_size,
                patch_size=cfg.patch_size,
                template=cfg.template,
                system_message=cfg.system_message,
                visual_attention_experts=cfg.visual_attention_experts,
                seed=job.seed,
                dtype=torch.float32,
            )
        else:
            raise ValueError(
                f"stage {job.stage} starts from the previous stage's model, but model.init {init} is not a "
                "Mono-InternVL folder (config.json with model_type 'internvl_chat'); run the stages in order with "
                "`evip run`, or point model.init at an exported stage"
            )
    check_tokenizer(tokenizer, model.config.llm_config.vocab_size)
    if model.config.img_context_token_id is None:
        model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return model.float(), tokenizer
