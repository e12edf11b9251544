"""InternLM2 decoder with modality-routed FFN experts (the ``language_model`` of Mono-InternVL).

Legend: B batch, L new tokens in this forward, S keys (cached + new), D width, H query heads, K kv heads,
Dh head dim, T = B * L flattened tokens, V vocab.

Per layer (pre-norm): ``h = x + Attn(RMSNorm(x))``, ``y = h + FFN_route(RMSNorm(h))``. ``FFN_route`` sends each
token to exactly one SwiGLU expert: ``feed_forward`` (text) or ``feed_forward_ve`` (visual, for
``<IMG_CONTEXT>`` tokens) through :func:`kernels.moe_ffn`, with routing built once per forward and shared
by all layers. A forward without visual tokens (text-only, every decode step) runs the text expert densely.
Parameter names are the release's, so the state dict needs no renaming.
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

import kernels

from .configuration import InternLM2Config


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps)`` in fp32, cast back, times the weight (InternLM2 / Llama order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """One FFN expert: ``w2(silu(w1 x) * (w3 x))``, no bias."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class ModalityRouting:
    """What one forward knows about modalities: the per-token routing shared by all layers."""

    routing: kernels.Routing


def rope_inv_freq(config: InternLM2Config, seq_len: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the linear position divisor (1.0 unless ``linear``) for a forward whose (padded, cache-inclusive) length is ``seq_len``.

    ``dynamic`` NTK rescales the base only when ``seq_len > max_position_embeddings``, from that length, as the
    release does (it measures the padded batch length including the cache). ``linear`` divides positions.
    """
    dim = config.head_dim
    base = float(config.rope_theta)
    factor_linear = 1.0
    scaling = config.rope_scaling
    if scaling is not None:
        kind = scaling.get("type", scaling.get("rope_type"))
        factor = float(scaling["factor"])
        if kind == "dynamic" and seq_len > config.max_position_embeddings:
            base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        elif kind == "linear":
            factor_linear = factor
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))
    return inv_freq, factor_linear


def rope_cos_sin(
    config: InternLM2Config, position_ids_BL: torch.Tensor, seq_len: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(B, 1, L, Dh)`` in ``dtype`` (rotate-half layout: both halves repeat)."""
    inv_freq, factor = rope_inv_freq(config, seq_len, position_ids_BL.device)
    pos = position_ids_BL.float()
    if factor != 1.0:
        pos = pos / factor  # divided, not multiplied by 1/factor: the release's rounding
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x_BHLD * cos + _rotate_half(x_BHLD) * sin


@dataclass
class PackedSequences:
    """Where the samples of packed rows lie, so attention runs per sample instead of over whole rows.

    A packed row of L tokens holding n samples with a block-diagonal causal mask makes SDPA compute all L^2 scores
    and mask most of them; a pack of twenty 50-token samples in a 1024-token row wastes ~95% of the attention
    work. Here every sample becomes one row of its own, padded at its end to the longest sample of its *bucket*
    (samples are bucketed by length, doubling from 16 tokens, so padding at most doubles a sample), and runs
    plain causal attention (padding at the end is never attended to by a real token). The results are scattered
    back; tokens outside every sample (row padding) get zeros.

    Pass it as ``attention_mask`` to :meth:`InternLM2Model.forward` (no KV cache: training and scoring only).
    ``position_ids`` must still restart at 0 for each sample.

    Attributes:
        buckets: ``(index_SM, inside, targets)`` per bucket: flat ``b * L + t`` token index of position m of
            sample s (the sample's first token where ``m`` is past its end); the flat ``s * M + m`` positions that
            are inside a sample, and their token indices (integer indices built on the host: scattering back needs
            no device-to-host sync).
        shape: ``(B, L)`` of the packed batch.
        longest: tokens of the longest sample: the sequence length that bounds positions (a packed row may be
            longer than the model's context as long as each of its samples fits).
    """

    buckets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    shape: tuple[int, int]
    longest: int

    @classmethod
    def from_lengths(cls, row_lengths: list[list[int]], num_cols: int, *, min_bucket: int = 16) -> "PackedSequences":
        """From the sample lengths of each row, in order (samples end to end from column 0)."""
        by_bucket: dict[int, list[tuple[int, int]]] = {}
        for b, lengths in enumerate(row_lengths):
            start = 0
            for n in lengths:
                if n < 1:
                    raise ValueError(f"row {b}: sample lengths must be >= 1, got {lengths}")
                size = min_bucket
                while size < n:
                    size *= 2
                by_bucket.setdefault(size, []).append((b * num_cols + start, n))
                start += n
            if start > num_cols:
                raise ValueError(f"row {b}: samples of {sum(lengths)} tokens do not fit {num_cols} columns")
        buckets = []
        longest = 0
        for size in sorted(by_bucket):
            starts = torch.tensor([st for st, _ in by_bucket[size]], dtype=torch.long)
            lengths = torch.tensor([n for _, n in by_bucket[size]], dtype=torch.long)
            m = torch.arange(int(lengths.max()), dtype=torch.long)
            valid = m[None, :] < lengths[:, None]
            index = torch.where(valid, starts[:, None] + m[None, :], starts[:, None])
            inside = valid.reshape(-1).nonzero().squeeze(1)
            buckets.append((index, inside, index.reshape(-1)[inside]))
            longest = max(longest, int(lengths.max()))
        return cls(buckets, (len(row_lengths), num_cols), longest)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedSequences":
        buckets = [tuple(t.to(device, non_blocking=non_blocking) for t in bucket) for bucket in self.buckets]
        return PackedSequences(buckets, self.shape, self.longest)


def packed_attention(
    q_BHLD: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, packed: PackedSequences, scale: float
) -> torch.Tensor:
    """Causal attention within each sample of ``packed`` (see :class:`PackedSequences`); ``(B, H, L, Dh)``."""
    b, h, l, dh = q_BHLD.shape
    if (b, l) != tuple(packed.shape):
        raise ValueError(f"PackedSequences describes a {packed.shape} batch, the forward has {(b, l)}")
    kh = k_BKLD.shape[1]
    q_TH = q_BHLD.transpose(1, 2).reshape(b * l, h, dh)
    k_TK = k_BKLD.transpose(1, 2).reshape(b * l, kh, dh)
    v_TK = v_BKLD.transpose(1, 2).reshape(b * l, kh, dh)
    out_TH = q_TH.new_zeros(b * l, h, dh)
    for index_SM, inside, targets in packed.buckets:
        q = q_TH[index_SM].transpose(1, 2)  # (S, H, M, Dh)
        k = k_TK[index_SM].transpose(1, 2)
        v = v_TK[index_SM].transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=h != kh)
        o_X = o.transpose(1, 2).reshape(-1, h, dh)  # (S * M, H, Dh)
        out_TH = out_TH.index_copy(0, targets, o_X.index_select(0, inside))
    return out_TH.view(b, l, h, dh).transpose(1, 2)


def build_attention_mask(
    attention_mask: torch.Tensor | PackedSequences | None, num_new: int, num_past: int, device: torch.device
) -> torch.Tensor | PackedSequences | None:
    """Boolean ``(B, 1, L, S)`` mask (True = may attend), or None when plain causal attention suffices.

    ``attention_mask`` is the usual 2-D ``(B, S)`` 0/1 padding mask over cached + new positions, or an
    already-built 4-D mask: boolean (True = attend) or additive float (0 = attend). Query rows that may attend to nothing (left padding) are
    opened to all keys so SDPA returns finite values; those positions are padding and never read. A
    :class:`PackedSequences` passes through (attention then runs per sample; no cache).
    """
    if isinstance(attention_mask, PackedSequences):
        if num_past:
            raise ValueError("a PackedSequences attention_mask cannot be used with a KV cache (num_past > 0)")
        return attention_mask
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        if attention_mask.is_floating_point():
            return attention_mask == 0  # additive mask (0 = attend, large negative = masked)
        raise ValueError(f"a 4-D attention_mask must be bool or additive float, got {attention_mask.dtype}")
    num_keys = num_past + num_new
    if attention_mask is None and (num_past == 0 or num_new == 1):
        return None  # plain causal (SDPA's is_causal) or a single query that sees every key
    if attention_mask is None:
        attention_mask = torch.ones(1, num_keys, dtype=torch.bool, device=device)
    if attention_mask.shape[-1] != num_keys:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the forward has {num_past} cached "
            f"+ {num_new} new = {num_keys}"
        )
    q_pos = torch.arange(num_past, num_keys, device=device)[:, None]
    k_pos = torch.arange(num_keys, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & attention_mask.to(torch.bool)[:, None, None, :]
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class InternLM2Attention(nn.Module):
    """GQA with one fused ``wqkv`` laid out per KV group: ``[q_{g*r} .. q_{g*r+r-1}, k_g, v_g]`` for each group g."""

    def __init__(self, config: InternLM2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_rep = self.num_heads // self.num_kv_heads
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_out, bias=config.bias)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def split_qkv(self, qkv_BLX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, L, (H + 2K) * Dh)`` grouped rows -> q ``(B, H, L, Dh)``, k, v ``(B, K, L, Dh)``."""
        b, l, _ = qkv_BLX.shape
        g = qkv_BLX.view(b, l, self.num_kv_heads, self.num_rep + 2, self.head_dim)
        q = g[:, :, :, : self.num_rep].reshape(b, l, self.num_heads, self.head_dim)
        k = g[:, :, :, -2]
        v = g[:, :, :, -1]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x_BLD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
        route: ModalityRouting | None,
        attention_ve: nn.Module | None,
    ) -> torch.Tensor:
        b, l, d = x_BLD.shape
        if attention_ve is not None and route is not None:
            qkv = kernels.routed_linear(
                x_BLD.reshape(b * l, d), route.routing, [self.wqkv.weight, attention_ve.wqkv.weight]
            ).view(b, l, -1)
        else:
            qkv = self.wqkv(x_BLD)
        q, k, v = self.split_qkv(qkv)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        num_past = 0
        if cache is not None:
            num_past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        if isinstance(mask, PackedSequences):
            out = packed_attention(q, k, v, mask, 1.0 / math.sqrt(self.head_dim))
        else:
            is_causal = mask is None and num_past == 0 and l > 1
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=1.0 / math.sqrt(self.head_dim),
                enable_gqa=self.num_rep > 1,
            )
        out = out.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim)
        if attention_ve is not None and route is not None:
            return kernels.routed_linear(out.reshape(b * l, -1), route.routing, [self.wo.weight, attention_ve.wo.weight]).view(
                b, l, d
            )
        return self.wo(out)


class VisualAttentionExpert(nn.Module):
    """Separate ``wqkv``/``wo`` for visual tokens (Mono-InternVL-1.5 idea); attention itself stays joint."""

    def __init__(self, attention: InternLM2Attention) -> None:
        super().__init__()
        self.wqkv = nn.Linear(attention.wqkv.in_features, attention.wqkv.out_features, bias=attention.wqkv.bias is not None)
        self.wo = nn.Linear(attention.wo.in_features, attention.wo.out_features, bias=attention.wo.bias is not None)


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = InternLM2Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = SwiGLU(config.hidden_size, config.intermediate_size)
        if config.has_visual_experts:
            self.feed_forward_ve = SwiGLU(config.hidden_size, config.intermediate_size)
            if config.visual_attention_experts:
                self.attention_ve = VisualAttentionExpert(self.attention)

    def ffn(self, x_BLD: torch.Tensor, route: ModalityRouting | None) -> torch.Tensor:
        if route is None or not hasattr(self, "feed_forward_ve"):
            return self.feed_forward(x_BLD)
        b, l, d = x_BLD.shape
        experts = (self.feed_forward, self.feed_forward_ve)
        y = kernels.moe_ffn(
            x_BLD.reshape(b * l, d),
            route.routing,
            [e.w1.weight for e in experts],
            [e.w3.weight for e in experts],
            [e.w2.weight for e in experts],
        )
        return y.view(b, l, d)

    def forward(self, x, cos, sin, mask, cache, route):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, route, getattr(self, "attention_ve", None))
        return h + self.ffn(self.ffn_norm(h), route)


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    _no_split_modules = ["InternLM2DecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class InternLM2Model(InternLM2PreTrainedModel):
    """Embeddings, decoder layers and the final norm (``language_model.model`` in the release)."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=_padding_idx(config))
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Activation checkpointing (``gradient_checkpointing_enable()``, or set True): each layer's activations are
        # recomputed in the backward pass instead of stored; only while training.
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        visual_token_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_visual_tokens: int | None = None,
    ) -> tuple[torch.Tensor, Cache | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, l, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        num_past = past_key_values.get_seq_length() if past_key_values is not None else 0
        seq_len = num_past + l
        limit = max_context_length(self.config)
        if isinstance(attention_mask, PackedSequences):
            # Positions restart per sample: the longest sample, not the row, must fit the context (and sets the
            # length dynamic RoPE scaling sees, as it would for that sample alone).
            seq_len = attention_mask.longest
            if seq_len > limit:
                raise ValueError(
                    f"a packed sample of {seq_len} tokens exceeds the model's context of {limit} tokens "
                    f"(max_position_embeddings {self.config.max_position_embeddings})"
                )
        elif seq_len > limit:
            raise ValueError(
                f"sequence of {seq_len} tokens ({num_past} cached + {l} new) exceeds the model's context of "
                f"{limit} tokens (max_position_embeddings {self.config.max_position_embeddings}"
                f"{', rope_scaling ' + str(self.config.rope_scaling) if self.config.rope_scaling else ''})"
            )
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, l, num_past, x.device)
        cos, sin = rope_cos_sin(self.config, position_ids, seq_len, x.dtype)
        mask = build_attention_mask(attention_mask, l, num_past, x.device)
        route = None
        if visual_token_mask is not None and self.config.has_visual_experts:
            # Host-side counts (when the caller has them) let the kernels slice per expert without a device sync.
            counts = None
            if num_visual_tokens is not None:
                counts = (visual_token_mask.numel() - num_visual_tokens, num_visual_tokens)
            route = ModalityRouting(kernels.build_routing(visual_token_mask.reshape(-1).to(torch.bool), 2, counts_host=counts))
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                checkpoint = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(
                    torch.utils.checkpoint.checkpoint, use_reentrant=False
                )
                x = checkpoint(layer.__call__, x, cos, sin, mask, past_key_values, route)
            else:
                x = layer(x, cos, sin, mask, past_key_values, route)
        return self.norm(x), past_key_values


def _padding_idx(config: InternLM2Config) -> int | None:
    """The embedding's padding row (kept at zero, never trained), as the release sets it from ``pad_token_id``.

    Not when the pad token is also an end token (SmolLM2 pads with ``<|im_end|>``): that row must train.
    """
    pad = config.pad_token_id
    eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
    if pad is None or not 0 <= pad < config.vocab_size or pad in eos:
        return None
    return pad


def max_context_length(config: InternLM2Config) -> int:
    """Longest sequence the decoder accepts: ``max_position_embeddings``, times the rope scaling factor if any.

    An unscaled RoPE may be reported as ``None`` or, by transformers 5 for Llama-family configs, as
    ``{"rope_type": "default", ...}`` without a ``factor``."""
    scaling = config.rope_scaling or {}
    if scaling.get("factor") is not None and scaling.get("rope_type", scaling.get("type")) != "default":
        return int(config.max_position_embeddings * float(scaling["factor"]))
    return config.max_position_embeddings


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, num_new: int, num_past: int, device: torch.device
) -> torch.Tensor:
    """``cumsum(mask) - 1`` over cached + new positions (left padding aware), else ``past .. past + L - 1``."""
    if isinstance(attention_mask, PackedSequences):
        raise ValueError("packed rows need position_ids that restart at 0 for each sample; none were given")
    if attention_mask is not None and attention_mask.dim() == 2:
        pos = attention_mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 1)
        return pos[:, -num_new:]
    return torch.arange(num_past, num_past + num_new, device=device).expand(batch, -1)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """Decoder + untied LM head ``output``; plain InternLM2 or, by ``llm_config.architectures``, with visual experts."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # Release llm_configs carry legacy generation fields (max_length 20, top_k 50, ...) that transformers
        # would turn into generation defaults; generation options belong to the call or generation_config.json.
        self.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        visual_token_mask: torch.Tensor | None = None,
        num_visual_tokens: int | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (fp32); ``loss`` is next-token cross entropy over labels != -100 (needs every position's logits).

        ``logits_to_keep`` picks the positions that get logits, so the LM head (the widest matmul) and the fp32
        logits are not paid for where nobody reads them: ``0`` every position ``(B, L, V)``; ``k > 0`` the last k
        ``(B, k, V)`` (generation asks for 1); a 1-D index tensor those sequence positions ``(B, K, V)``; a boolean
        ``(B, L)`` mask the marked positions of all rows, flattened in row-major order ``(N, V)`` (training: the
        positions with a target).
        """
        check_loss_inputs(labels, logits_to_keep)
        hidden, cache = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            visual_token_mask=visual_token_mask,
            use_cache=use_cache,
            num_visual_tokens=num_visual_tokens,
        )
        logits = self.output(keep_positions(hidden, logits_to_keep)).float()
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        visual_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        # Written out rather than inherited: the first step feeds the prompt (embeddings and the routing mask,
        # which is meaningful only for the prompt); every later step feeds the newest token, always text.
        num_past = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs = {"past_key_values": past_key_values, "attention_mask": attention_mask, "use_cache": True}
        if "logits_to_keep" in kwargs:  # generate() asks for the last position only (assisted decoding: more)
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        if num_past == 0:
            if inputs_embeds is not None:
                inputs["inputs_embeds"] = inputs_embeds
            else:
                inputs["input_ids"] = input_ids
            inputs["visual_token_mask"] = visual_token_mask
            if visual_token_mask is not None:
                # Counted once, at prefill, on the mask as generate() expanded it (beams, num_return_sequences).
                inputs["num_visual_tokens"] = int(visual_token_mask.sum())
        else:
            inputs["input_ids"] = input_ids[:, -1:]
        return inputs


class InternLM2VEForCausalLM(InternLM2ForCausalLM):
    """The Mono-InternVL decoder: :class:`InternLM2ForCausalLM` whose layers carry ``feed_forward_ve``."""


def check_loss_inputs(labels: torch.Tensor | None, logits_to_keep: int | torch.Tensor) -> None:
    """``labels`` (the built-in loss) need every position's logits."""
    if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("labels need the logits of every position; pass logits_to_keep=0 with labels")


def keep_positions(hidden_BLD: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The hidden states that get logits (see :meth:`InternLM2ForCausalLM.forward`'s ``logits_to_keep``)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dtype == torch.bool:
            if logits_to_keep.shape != hidden_BLD.shape[:2]:
                raise ValueError(
                    f"logits_to_keep mask has shape {tuple(logits_to_keep.shape)}, the sequence batch "
                    f"{tuple(hidden_BLD.shape[:2])}"
                )
            return hidden_BLD[logits_to_keep.to(hidden_BLD.device)]
        if logits_to_keep.dim() != 1:
            raise ValueError(f"logits_to_keep indices must be 1-D, got shape {tuple(logits_to_keep.shape)}")
        return hidden_BLD[:, logits_to_keep.to(hidden_BLD.device)]
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 or a tensor, got {logits_to_keep!r}")
    return hidden_BLD[:, -logits_to_keep:] if logits_to_keep else hidden_BLD


def causal_lm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over positions whose label is not -100."""
    shift_logits = logits_BLV[:, :-1].reshape(-1, logits_BLV.shape[-1])
    shift_labels = labels_BL[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
