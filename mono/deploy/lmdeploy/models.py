"""Mono-InternVL for LMDeploy's PyTorch engine (LMDeploy >= 0.12.2; written against 0.18, runs on 0.14 too).

Legend: T tokens of one engine step (LMDeploy packs every sequence of a step into one row, so activations are
``(1, T, D)``), D decoder width, F FFN width, H / K query / kv heads, Dh head dim, N tiles, Q tokens per tile,
Cv patch width.

:class:`MonoInternVLChatModel` is what the module map (:mod:`mono.deploy.lmdeploy.module_map`) names for the
``InternVLChatModel`` architecture. It dispatches on the config: a Mono config builds this module's model, any
other InternVL config LMDeploy's own ``InternVLChatModel``. The Mono model is

- the vision side of :mod:`mono.vision` itself (patch embedding with the class slot dropped, pixel shuffle v2,
  the ``mlp1`` projector), so its numerics are this project's by construction;
- the InternLM2 decoder rebuilt from LMDeploy's building blocks (fused qkv / gate-up linears, RMSNorm with the
  fused residual add, rotary embedding, paged attention), with the routed FFN of SPEC section 1: in a prefill
  step that carries image tiles, the rows at ``<IMG_CONTEXT>`` go to ``feed_forward_ve`` and all other rows to
  ``feed_forward``; every decode step is text only and runs ``feed_forward`` densely (CUDA-graph friendly).

Weights load from the release names (:mod:`mono.deploy.lmdeploy.mapping` documents the two re-layouts).
bf16 only: fp16 is refused at construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmdeploy.pytorch.model_inputs import StepContext, StepContextManager
from lmdeploy.pytorch.models.internvl import InternVLChatModel, InternVLInputProcessor
from lmdeploy.pytorch.models.utils.cudagraph import CudaGraphMixin
from lmdeploy.pytorch.models.utils.model import DeployModelMixinV1, build_embedding, vlm_model
from lmdeploy.pytorch.nn import ApplyRotaryEmb, Attention, RMSNorm, RopeType, SiluAndMul, build_rotary_embedding
from lmdeploy.pytorch.nn.linear import build_down_linear, build_gateup_linear, build_o_proj, build_qkv_proj
from lmdeploy.pytorch.weight_loader.model_weight_loader import load_weight

from ...configuration import MONO_LLM_ARCHITECTURE, PatchEmbedConfig
from ...vision import PatchEmbeddings, pixel_shuffle
from .mapping import LLM_PREFIX, internal_name, routing_rows, split_wqkv

__all__ = ["MonoInternLM2VEForCausalLM", "MonoInternVLChatModel", "is_mono_config"]

_FP16_ERROR = (
    "Mono-InternVL runs in bfloat16 under LMDeploy; fp16 overflows in the decoder's activations on image prompts: "
    "use --dtype bfloat16 (PytorchEngineConfig(dtype='bfloat16'); mono.deploy.lmdeploy.engine_config() sets it)"
)


def _get(config: Any, key: str, default: Any = None) -> Any:
    """A field of a config that may be an object (remote-code config) or a dict (plain ``PretrainedConfig``)."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def is_mono_config(config: Any) -> bool:
    """True for an InternVL chat config whose ``llm_config.architectures[0]`` is ``InternLM2VEForCausalLM``."""
    archs = _get(_get(config, "llm_config") or {}, "architectures") or []
    return bool(archs) and archs[0] == MONO_LLM_ARCHITECTURE


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype == torch.float16:
        raise ValueError(_FP16_ERROR)


# =============================================================================================== decoder
class MonoAttention(nn.Module):
    """InternLM2 attention: one fused ``wqkv`` (loaded from the grouped layout), rotary, paged attention, ``wo``."""

    def __init__(self, config: Any, dtype: torch.dtype | None, device: torch.device | None) -> None:
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = config.num_key_value_heads
        head_dim = config.hidden_size // num_heads
        quant_config = getattr(config, "quantization_config", None)
        self.wqkv = build_qkv_proj(
            config.hidden_size, num_q_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_dim,
            bias=config.bias, quant_config=quant_config, dtype=dtype, device=device,
            num_replicate_kv_heads=getattr(config, "num_replicate_key_value_heads", 1),
        )
        self.apply_rotary_pos_emb = ApplyRotaryEmb()
        self.attn_fwd = Attention(num_heads, head_dim, num_kv_heads=num_kv_heads)
        self.wo = build_o_proj(num_heads * head_dim, config.hidden_size, bias=config.bias, quant_config=quant_config,
                               dtype=dtype, device=device, is_tp=True)

    def forward(self, x_1TD: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], past_key_value: Any,
                attn_metadata: Any) -> torch.Tensor:
        qkv = self.wqkv(x_1TD).flatten(0, -2)  # (T, (H + 2K) Dh) in [q; k; v] order
        q, k, v = self.wqkv.split_qkv(qkv)  # (T, H, Dh), (T, K, Dh), (T, K, Dh)
        cos, sin = rotary
        q, k = self.apply_rotary_pos_emb(q, k, cos, sin, inplace=True)
        out = self.attn_fwd(
            q, k, v, past_key_value[0], past_key_value[1], attn_metadata,
            k_scales_zeros=None if len(past_key_value) == 2 else past_key_value[2],
            v_scales_zeros=None if len(past_key_value) == 2 else past_key_value[3],
            inplace=True,
        )
        return self.wo(out.reshape(*x_1TD.shape[:-1], -1))


class MonoExpert(nn.Module):
    """One SwiGLU expert, ``w2(silu(w1 x) * w3 x)``, with ``w1``/``w3`` packed into ``gate_up_proj``."""

    def __init__(self, config: Any, dtype: torch.dtype | None, device: torch.device | None) -> None:
        super().__init__()
        quant_config = getattr(config, "quantization_config", None)
        f = config.intermediate_size
        self.gate_up_proj = build_gateup_linear(config.hidden_size, [f, f], bias=False, dtype=dtype, device=device,
                                                quant_config=quant_config, is_tp=True)
        self.act_fn = SiluAndMul(inplace=True)
        self.w2 = build_down_linear(f, config.hidden_size, bias=False, quant_config=quant_config, dtype=dtype,
                                    device=device, is_tp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.gate_up_proj(x)))


class MonoDecoderLayer(nn.Module):
    """Pre-norm block with two FFN experts; the routing rows are shared by all layers of a step."""

    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype | None, device: torch.device | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        quant_config = getattr(config, "quantization_config", None)
        self.attention = MonoAttention(config, dtype, device)
        self.feed_forward = MonoExpert(config, dtype, device)
        self.feed_forward_ve = MonoExpert(config, dtype, device)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, quant_config=quant_config, dtype=dtype,
                                      device=device)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, quant_config=quant_config, dtype=dtype,
                                device=device)

    def ffn(self, h_1TD: torch.Tensor, visual_rows: torch.Tensor | None,
            text_rows: torch.Tensor | None) -> torch.Tensor:
        if visual_rows is None:
            return self.feed_forward(h_1TD)
        out = torch.empty_like(h_1TD)
        out[:, visual_rows] = self.feed_forward_ve(h_1TD[:, visual_rows])
        if text_rows is not None:
            out[:, text_rows] = self.feed_forward(h_1TD[:, text_rows])
        return out

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], past_key_value: Any,
                residual: torch.Tensor | None, attn_metadata: Any, visual_rows: torch.Tensor | None,
                text_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.attention_norm(hidden)
        else:
            hidden, residual = self.attention_norm(hidden, residual)
        hidden = self.attention(hidden, rotary, past_key_value, attn_metadata)
        hidden, residual = self.ffn_norm(hidden, residual)
        return self.ffn(hidden, visual_rows, text_rows), residual


def _rotary_embedding(config: Any) -> nn.Module:
    """RoPE from the release fields (``rope_theta``, ``rope_scaling {type: dynamic | linear, factor}``).

    Read directly rather than through transformers' ``rope_parameters``, which InternLM2 configs do not fill.
    """
    scaling = _get(config, "rope_scaling")
    emb_type, factor = RopeType.Default, 1.0
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        factor = float(scaling.get("factor", 1.0))
        emb_type = {"dynamic": RopeType.DynamicNTKScaling, "linear": RopeType.LinearScaling}.get(kind)
        if emb_type is None:
            raise ValueError(f"llm_config.rope_scaling type {kind!r} is not supported (dynamic or linear)")
    return build_rotary_embedding(config.hidden_size // config.num_attention_heads, config.max_position_embeddings,
                                  float(config.rope_theta), factor, emb_type=emb_type)


class MonoInternLM2Model(nn.Module):
    """``tok_embeddings``, the layers, the final ``norm`` (``language_model.model`` in the release)."""

    def __init__(self, config: Any, dtype: torch.dtype | None, device: torch.device | None) -> None:
        super().__init__()
        # padding_idx None: LMDeploy would zero the pad row on load; the release and mono keep the stored row.
        self.tok_embeddings = build_embedding(config.vocab_size, config.hidden_size, None, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            MonoDecoderLayer(config, i, dtype, device) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = _rotary_embedding(config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_key_values: list, attn_metadata: Any,
                inputs_embeds: torch.Tensor | None, visual_rows: torch.Tensor | None,
                text_rows: torch.Tensor | None) -> torch.Tensor:
        hidden = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary_emb(hidden, position_ids)
        rotary = (cos[0], sin[0])
        residual = None
        for layer, past_key_value in zip(self.layers, past_key_values):
            hidden, residual = layer(hidden, rotary, past_key_value, residual, attn_metadata, visual_rows, text_rows)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class MonoInternLM2VEForCausalLM(nn.Module, DeployModelMixinV1, CudaGraphMixin):
    """The Mono decoder with its untied head ``output`` (``language_model`` in the release)."""

    packed_modules_mapping = {"gate_up_proj": ["w1", "w3"]}

    def __init__(self, config: Any, ctx_mgr: StepContextManager, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        _check_dtype(dtype)
        self.config = config
        self.ctx_mgr = ctx_mgr
        self.model = MonoInternLM2Model(config, dtype, device)
        self.output = self.build_lm_head(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        self.lm_head = self.output

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_key_values: list,
                attn_metadata: Any = None, inputs_embeds: torch.Tensor | None = None,
                visual_rows: torch.Tensor | None = None, text_rows: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        """Hidden states ``(1, T, D)``; ``visual_rows`` / ``text_rows`` index T (None: every row is text)."""
        return self.model(input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds, visual_rows,
                          text_rows)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    def prepare_inputs_for_generation(self, past_key_values: list, inputs_embeds: torch.Tensor | None = None,
                                      context: StepContext = None) -> dict[str, Any]:
        input_ids = context.input_ids
        inputs_embeds, visual_rows, text_rows = _scatter_input_embeddings(
            context, input_ids, inputs_embeds, self.get_input_embeddings())
        return dict(input_ids=input_ids, position_ids=context.position_ids, past_key_values=past_key_values,
                    attn_metadata=context.attn_metadata, inputs_embeds=inputs_embeds, visual_rows=visual_rows,
                    text_rows=text_rows)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load release-named decoder tensors (``model.layers.{i}...``, ``output.weight``)."""
        config = self.config
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        num_kv_heads //= getattr(config, "num_replicate_key_value_heads", 1)  # LMDeploy raises it for tp > kv heads
        head_dim = config.hidden_size // num_heads
        params = dict(self.named_parameters())
        for name, tensor in weights:
            if "rotary_emb." in name:
                continue
            target, shard = internal_name(name)
            param = params.get(target)
            if param is None:
                raise KeyError(f"checkpoint tensor {LLM_PREFIX}{name} has no parameter {target} in the Mono-InternVL "
                               "decoder; is this a Mono-InternVL checkpoint in the release layout?")
            if shard == "qkv":
                for part, piece in zip("qkv", split_wqkv(tensor, num_heads, num_kv_heads, head_dim)):
                    load_weight(param, piece, shard_id=part)
            elif shard is None:
                load_weight(param, tensor)
            else:
                load_weight(param, tensor, shard_id=shard)


def _scatter_input_embeddings(context, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None,
                              embed: nn.Module) -> tuple[torch.Tensor | None, Any, Any]:
    """Put LMDeploy's precomputed ``context.input_embeddings`` at their rows; ``(embeds, visual_rows, text_rows)``
    (rows None when there are none)."""
    if context.input_embeddings is None or len(context.input_embeddings) == 0:
        return inputs_embeds, None, None
    indexing = context.input_embedding_indexing
    if inputs_embeds is None:
        inputs_embeds = embed(input_ids)
    inputs_embeds[:, indexing, :] = context.input_embeddings.to(inputs_embeds)
    return (inputs_embeds, *_rows_from_index(indexing, input_ids.shape[-1]))


def _rows_from_index(indexing: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    mask = torch.zeros(num_tokens, dtype=torch.bool, device=indexing.device)
    mask[indexing] = True
    return routing_rows(mask)


# =============================================================================================== vision
@vlm_model
class MonoVisionModel(nn.Module):
    """``vision_model``: this project's :class:`mono.vision.PatchEmbeddings` (names ``embeddings.*``)."""

    def __init__(self, vision_config: Any, dtype: torch.dtype | None, device: torch.device | None) -> None:
        super().__init__()
        config = PatchEmbedConfig(
            hidden_size=_get(vision_config, "hidden_size"), image_size=_get(vision_config, "image_size"),
            patch_size=_get(vision_config, "patch_size"), num_channels=_get(vision_config, "num_channels", 3),
        )
        with torch.device(device if device is not None else "cpu"):
            self.embeddings = PatchEmbeddings(config)
        if dtype is not None:
            self.embeddings.to(dtype)

    def forward(self, pixel_values_NCSS: torch.Tensor) -> torch.Tensor:
        return self.embeddings(pixel_values_NCSS)  # (N, G*G, Cv), class slot dropped


# =============================================================================================== top level
class MonoInternVLChatModel(nn.Module, DeployModelMixinV1, CudaGraphMixin):
    """The registered ``InternVLChatModel``: Mono configs get this model, other InternVL configs LMDeploy's own."""

    def __new__(cls, config: Any, ctx_mgr: StepContextManager = None, dtype: torch.dtype | None = None,
                device: torch.device | None = None):
        if not is_mono_config(config):
            # Not ours: LMDeploy's InternVL implementation, built exactly as its own module map would build it
            # (an instance of another class, so Python does not run our __init__ on it).
            return InternVLChatModel(config, ctx_mgr, dtype=dtype, device=device)
        return super().__new__(cls)

    def __init__(self, config: Any, ctx_mgr: StepContextManager, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        _check_dtype(dtype)
        if _get(config, "select_layer", -1) != -1:
            raise ValueError(f"select_layer {config.select_layer}: Mono-InternVL uses the patch embedding output (-1)")
        llm_config = config.llm_config
        if _get(llm_config, "visual_attention_experts", False):
            raise ValueError("llm_config.visual_attention_experts (per-modality attention projections) is not "
                             "implemented for LMDeploy; serve such checkpoints with `mono serve --engine own`")
        self.config = config
        self.ctx_mgr = ctx_mgr
        self.downsample_ratio = float(config.downsample_ratio)
        self.ps_version = _get(config, "ps_version", "v2")
        self.vision_model = MonoVisionModel(config.vision_config, dtype, device)
        r = round(1 / self.downsample_ratio)
        width, d = config.vision_config.hidden_size * r * r, llm_config.hidden_size
        with torch.device(device if device is not None else "cpu"):
            self.mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d), nn.GELU(), nn.Linear(d, d))
        if dtype is not None:
            self.mlp1.to(dtype)
        self.language_model = MonoInternLM2VEForCausalLM(llm_config, ctx_mgr, dtype=dtype, device=device)
        self.lm_head = self.language_model.lm_head
        self.input_processor = InternVLInputProcessor(config, dtype)

    def extract_feature(self, pixel_values_NCSS: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` tiles -> ``(N, Q, D)`` visual tokens, exactly :meth:`mono.MonoInternVL.extract_feature`."""
        patches = self.vision_model(pixel_values_NCSS)
        n, p, c = patches.shape
        g = int(round(p**0.5))
        shuffled = pixel_shuffle(patches.reshape(n, g, g, c), self.downsample_ratio, self.ps_version)
        return self.mlp1(shuffled.reshape(n, -1, shuffled.shape[-1]))

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_key_values: list,
                attn_metadata: Any = None, pixel_values: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                visual_rows: torch.Tensor | None = None, text_rows: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        """Hidden states ``(1, T, D)``; a prefill step with tiles embeds them at ``image_mask``, routing those rows."""
        if inputs_embeds is None and pixel_values is not None:
            feats = self.extract_feature(pixel_values)  # (N, Q, D)
            inputs_embeds = self.get_input_embeddings()(input_ids)
            num_slots = int(image_mask.sum())
            if num_slots != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"{num_slots} <IMG_CONTEXT> tokens in the step but {feats.shape[0]} tiles x {feats.shape[1]} "
                    f"tokens = {feats.shape[0] * feats.shape[1]} visual tokens; the folder's force_image_size, "
                    "patch_size and downsample_ratio must agree with its vision_config"
                )
            inputs_embeds.masked_scatter_(image_mask[..., None], feats.to(inputs_embeds.dtype))
            visual_rows, text_rows = routing_rows(image_mask.reshape(-1))
        return self.language_model(input_ids, position_ids, past_key_values, attn_metadata, inputs_embeds,
                                   visual_rows=visual_rows, text_rows=text_rows)

    def prepare_inputs_for_generation(self, past_key_values: list, inputs_embeds: torch.Tensor | None = None,
                                      context: StepContext = None) -> dict[str, Any]:
        input_ids = context.input_ids
        pixel_values = image_mask = None
        if context.input_multimodals is not None:
            images = [d for per_seq in context.input_multimodals for d in per_seq.get("image", [])]
            if images:
                image_mask = input_ids == images[0].meta["image_token_id"]
                pixel_values = torch.cat([d.data for d in images])
        # Visual tokens given as embeddings (no tiles) are still routed to the visual expert.
        inputs_embeds, visual_rows, text_rows = _scatter_input_embeddings(
            context, input_ids, inputs_embeds, self.get_input_embeddings())
        return dict(input_ids=input_ids, position_ids=context.position_ids, past_key_values=past_key_values,
                    attn_metadata=context.attn_metadata, pixel_values=pixel_values, image_mask=image_mask,
                    inputs_embeds=inputs_embeds, visual_rows=visual_rows, text_rows=text_rows)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Release names: ``language_model.*`` to the decoder, ``vision_model.*`` and ``mlp1.*`` copied."""
        params = dict(self.named_parameters())
        decoder = []
        for name, tensor in weights:
            if name.startswith(LLM_PREFIX):
                decoder.append((name[len(LLM_PREFIX):], tensor))
                continue
            param = params.get(name)
            if param is None:
                raise KeyError(f"checkpoint tensor {name} has no parameter in the Mono-InternVL model (vision_model, "
                               "mlp1, language_model); is this a Mono-InternVL checkpoint in the release layout?")
            load_weight(param, tensor)
        self.language_model.load_weights(decoder)

    def get_input_processor(self) -> InternVLInputProcessor:
        return self.input_processor
