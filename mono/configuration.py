"""Configuration classes mirroring the released Mono-InternVL ``config.json``.

Three classes, nested the way the release nests them:

- :class:`MonoInternVLConfig` (``model_type: internvl_chat``) — the outer chat config;
- :class:`PatchEmbedConfig` (``vision_config``, ``model_type: intern_vit_patch``) — the patch embedding;
- :class:`InternLM2Config` (``llm_config``, ``model_type: internlm2``) — the decoder.

Round trip rule: reading a release ``config.json`` and writing it back keeps every field. transformers v5
rewrites or drops many keys the release carries (legacy generation fields, ``rope_scaling``, ``torch_dtype``,
``_commit_hash``), so these classes do not hand unknown keys to ``PreTrainedConfig.__init__``: they keep them
verbatim in ``_extra_fields`` and serialise them back in :meth:`to_dict`. Typed fields are the ones the model
reads; everything else is carried along untouched.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig
from transformers import __version__ as _transformers_version

# The one switch LMDeploy, vLLM and the release's own code use to recognise a Mono-InternVL decoder.
MONO_LLM_ARCHITECTURE = "InternLM2VEForCausalLM"
PLAIN_LLM_ARCHITECTURE = "InternLM2ForCausalLM"
SUPPORTED_LLM_ARCHITECTURES = (MONO_LLM_ARCHITECTURE,)
RELEASE_ARCHITECTURE = "InternVLChatModel"


class _FieldPreservingConfig(PreTrainedConfig):
    """Base for configs that must write back every key they were read from.

    Subclasses list their typed fields in ``_typed_fields``; every other key passed to ``__init__`` is kept
    in ``_extra_fields`` and re-emitted by :meth:`to_dict` exactly as it was read.
    """

    _typed_fields: tuple[str, ...] = ()

    def _init_preserving(self, extra: dict[str, Any]) -> None:
        dtype = extra.pop("dtype", None)
        torch_dtype = extra.pop("torch_dtype", None)
        name_or_path = extra.pop("_name_or_path", None)
        loaded_from = extra.pop("name_or_path", None)  # passed by AutoConfig; not part of the file
        # Only `dtype` goes through transformers' own init; it is re-emitted under the release key.
        super().__init__(dtype=dtype if dtype is not None else torch_dtype)
        self._extra_fields = {k: copy.deepcopy(v) for k, v in extra.items() if k != "transformers_version"}
        if "auto_map" in self._extra_fields:
            # transformers' Auto classes look for remote code in the attribute `config.auto_map`, not in the file.
            self.auto_map = copy.deepcopy(self._extra_fields["auto_map"])
        # Kept as read (even null); configs we create record the transformers version that wrote them.
        self._source_transformers_version = extra.get("transformers_version", _transformers_version)
        self._had_name_or_path = name_or_path is not None
        if name_or_path is not None or loaded_from is not None:
            self._name_or_path = str(name_or_path if name_or_path is not None else loaded_from)

    def _typed_dict(self) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self._typed_fields}

    def to_dict(self) -> dict[str, Any]:
        """Every field: the preserved ones as read, the typed ones as currently set."""
        out: dict[str, Any] = dict(copy.deepcopy(self._extra_fields))
        out.update(self._typed_dict())
        if getattr(self, "auto_map", None) is not None:
            out["auto_map"] = copy.deepcopy(self.auto_map)
        out["model_type"] = self.model_type
        if self.dtype is not None:
            out["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        elif "torch_dtype" not in out:
            out["torch_dtype"] = None
        if self._had_name_or_path:
            out["_name_or_path"] = str(getattr(self, "_name_or_path", ""))
        out["transformers_version"] = self._source_transformers_version
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # The release writes full configs; a diff against class defaults would drop fields loaders read.
        return self.to_dict()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    __hash__ = None  # type: ignore[assignment]


class PatchEmbedConfig(_FieldPreservingConfig):
    """``vision_config``: the patch embedding that replaces a vision transformer.

    Only ``hidden_size`` (Cv), ``image_size`` (the tile size the position embedding was learned at) and
    ``patch_size`` change the computation; the release also stores InternViT fields, which are preserved.
    """

    model_type = "intern_vit_patch"
    _typed_fields = ("hidden_size", "image_size", "patch_size", "num_channels", "initializer_range")

    def __init__(
        self,
        hidden_size: int = 1024,
        image_size: int = 448,
        patch_size: int = 14,
        num_channels: int = 3,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("model_type", None)
        self._init_preserving(kwargs)
        self.hidden_size = int(hidden_size)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.num_channels = int(num_channels)
        self.initializer_range = float(initializer_range)
        for name in ("hidden_size", "image_size", "patch_size", "num_channels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vision_config.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )


class InternLM2Config(_FieldPreservingConfig):
    """``llm_config``: an InternLM2 decoder, optionally with visual FFN experts in every layer.

    ``architectures[0]`` decides the layer type: ``InternLM2VEForCausalLM`` (Mono-InternVL: a visual FFN expert
    ``feed_forward_ve`` beside every ``feed_forward``) or ``InternLM2ForCausalLM`` (a plain LLM).
    ``visual_attention_experts`` (Mono-InternVL-1.5 idea, no public weights) adds ``attention_ve.{wqkv,wo}``
    per layer; it is written to ``config.json`` only when on, so the release layout stays untouched.
    """

    model_type = "internlm2"
    _typed_fields = (
        "architectures",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "bias",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "initializer_range",
        "use_cache",
    )

    def __init__(
        self,
        vocab_size: int = 92553,
        hidden_size: int = 2048,
        intermediate_size: int = 8192,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 8,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 1_000_000.0,
        rope_scaling: dict[str, Any] | None = None,
        bias: bool = False,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        architectures: list[str] | None = None,
        visual_attention_experts: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("model_type", None)
        self._init_preserving(kwargs)
        self.architectures = list(architectures) if architectures else [MONO_LLM_ARCHITECTURE]
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = int(num_key_value_heads if num_key_value_heads is not None else num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = int(max_position_embeddings)
        self.rms_norm_eps = float(rms_norm_eps)
        self.rope_theta = rope_theta
        self.rope_scaling = copy.deepcopy(rope_scaling)
        self.bias = bool(bias)
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.initializer_range = float(initializer_range)
        self.use_cache = bool(use_cache)
        self.visual_attention_experts = bool(visual_attention_experts)
        self._validate()

    # transformers v5 turns `rope_scaling` into a deprecated alias of `rope_parameters`; our decoder reads the
    # release's own dict, so the attribute is stored under a private name and exposed unchanged.
    @property
    def rope_scaling(self) -> dict[str, Any] | None:  # type: ignore[override]
        return self.__dict__.get("_mono_rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        self.__dict__["_mono_rope_scaling"] = value

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        # Loaders (LMDeploy's config builder) assign it back; only the value the shape implies is accepted.
        if int(value) != self.hidden_size // self.num_attention_heads:
            raise ValueError(f"head_dim {value} != hidden_size // num_attention_heads = "
                             f"{self.hidden_size // self.num_attention_heads}; InternLM2 derives it from those")

    @property
    def has_visual_experts(self) -> bool:
        return self.architectures[0] == MONO_LLM_ARCHITECTURE

    def _validate(self) -> None:
        if self.architectures[0] not in (MONO_LLM_ARCHITECTURE, PLAIN_LLM_ARCHITECTURE):
            raise ValueError(
                f"llm_config.architectures[0] is {self.architectures[0]!r}; this decoder implements "
                f"{MONO_LLM_ARCHITECTURE!r} (Mono-InternVL) and {PLAIN_LLM_ARCHITECTURE!r} (plain InternLM2)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"llm_config.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"llm_config.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"llm_config.hidden_act must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        if self.visual_attention_experts and self.bias:
            raise ValueError(
                "llm_config.visual_attention_experts needs bias: false (the routed projections carry no bias)"
            )
        if self.head_dim % 2:
            raise ValueError(f"llm_config head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            factor = self.rope_scaling.get("factor")
            if kind not in ("linear", "dynamic"):
                raise ValueError(f"llm_config.rope_scaling.type must be 'linear' or 'dynamic', got {kind!r}")
            if not isinstance(factor, (int, float)) or factor < 1.0:
                raise ValueError(f"llm_config.rope_scaling.factor must be a number >= 1, got {factor!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.visual_attention_experts:
            out["visual_attention_experts"] = True
        return out


class MonoInternVLConfig(_FieldPreservingConfig):
    """The outer ``internvl_chat`` config: vision + decoder + how images become tokens.

    ``tokens_per_tile`` = (force_image_size / patch_size)^2 * downsample_ratio^2 (256 at 448 px).
    ``template`` names a chat template of :mod:`mono.templates`; ``system_message`` (ours, optional)
    overrides its default system text.
    """

    model_type = "internvl_chat"
    sub_configs = {"vision_config": PatchEmbedConfig, "llm_config": InternLM2Config}
    _typed_fields = (
        "downsample_ratio",
        "force_image_size",
        "select_layer",
        "template",
        "dynamic_image_size",
        "use_thumbnail",
        "ps_version",
        "min_dynamic_patch",
        "max_dynamic_patch",
    )

    def __init__(
        self,
        vision_config: dict[str, Any] | PatchEmbedConfig | None = None,
        llm_config: dict[str, Any] | InternLM2Config | None = None,
        downsample_ratio: float = 0.5,
        force_image_size: int | None = None,
        select_layer: int = -1,
        template: str = "internlm2-chat",
        dynamic_image_size: bool = True,
        use_thumbnail: bool = True,
        ps_version: str = "v2",
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        img_context_token_id: int | None = None,
        system_message: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("model_type", None)
        kwargs.pop("architectures", None)  # always written as the release's InternVLChatModel
        # The outer check first: its message explains more than the nested config's would.
        if isinstance(llm_config, dict) and llm_config.get("architectures"):
            if llm_config["architectures"][0] not in SUPPORTED_LLM_ARCHITECTURES:
                raise ValueError(_unsupported_llm_message(llm_config["architectures"]))
        # Sub-configs first: transformers' init-time validators already ask for the text config.
        self.vision_config = _as_config(vision_config, PatchEmbedConfig, "vision_config")
        self.llm_config = _as_config(llm_config, InternLM2Config, "llm_config")
        self._init_preserving(kwargs)
        self.architectures = ["InternVLChatModel"]  # what loaders read (LMDeploy: hf_config.architectures[0])
        self.downsample_ratio = float(downsample_ratio)
        self.force_image_size = force_image_size
        self.select_layer = select_layer
        self.template = template
        self.dynamic_image_size = bool(dynamic_image_size)
        self.use_thumbnail = bool(use_thumbnail)
        self.ps_version = ps_version
        self.min_dynamic_patch = int(min_dynamic_patch)
        self.max_dynamic_patch = int(max_dynamic_patch)
        self.img_context_token_id = img_context_token_id
        self.system_message = system_message
        self.tie_word_embeddings = False
        self._validate()

    @property
    def image_size(self) -> int:
        """Tile side in pixels."""
        return int(self.force_image_size or self.vision_config.image_size)

    @property
    def tokens_per_tile(self) -> int:
        grid = self.image_size // self.vision_config.patch_size
        return int(grid * grid * self.downsample_ratio**2)

    def get_text_config(self, *args: Any, **kwargs: Any) -> InternLM2Config:
        return self.llm_config

    def _validate(self) -> None:
        if self.llm_config.architectures[0] not in SUPPORTED_LLM_ARCHITECTURES:
            raise ValueError(_unsupported_llm_message(self.llm_config.architectures))
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        ratio_inv = 1.0 / self.downsample_ratio
        if abs(ratio_inv - round(ratio_inv)) > 1e-9:
            raise ValueError(f"downsample_ratio must be 1/k for an integer k, got {self.downsample_ratio}")
        grid = self.image_size // self.vision_config.patch_size
        if self.image_size % self.vision_config.patch_size or grid % round(ratio_inv):
            raise ValueError(
                f"force_image_size {self.image_size} must give a patch grid ({grid}) divisible by "
                f"1/downsample_ratio ({round(ratio_inv)})"
            )
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise ValueError(
                f"need 1 <= min_dynamic_patch ({self.min_dynamic_patch}) <= max_dynamic_patch "
                f"({self.max_dynamic_patch})"
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["architectures"] = [RELEASE_ARCHITECTURE]
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        if self.img_context_token_id is not None or "img_context_token_id" in self._extra_fields:
            out["img_context_token_id"] = self.img_context_token_id
        if self.system_message is not None:
            out["system_message"] = self.system_message
        return out


def _unsupported_llm_message(architectures: Any) -> str:
    return (
        f"llm_config.architectures is {architectures!r}; a Mono-InternVL checkpoint needs "
        f"{list(SUPPORTED_LLM_ARCHITECTURES)!r} (other InternVL checkpoints use a vision transformer, "
        "which this package does not implement)"
    )


def _as_config(value: Any, cls: type[_FieldPreservingConfig], name: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**copy.deepcopy(value))
    raise ValueError(f"{name} must be a dict or {cls.__name__}, got {type(value).__name__}")
