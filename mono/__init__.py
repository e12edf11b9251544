"""Mono-InternVL: a native multimodal LLM (patch embedding + visual FFN experts in every decoder layer).

Public names: :class:`MonoInternVL`, :class:`MonoInternVLConfig`; the decoder :class:`InternLM2VEForCausalLM`;
:mod:`mono.processing` (tiling, ``load_image``), :mod:`mono.templates` (chat templates),
:mod:`mono.tokenization` (``load_tokenizer``). Importing ``mono`` registers the classes with transformers'
``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` (``model_type`` ``internvl_chat`` and ``internlm2``).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import InternLM2Config, MonoInternVLConfig, PatchEmbedConfig
from .internlm2 import InternLM2ForCausalLM, InternLM2VEForCausalLM
from .modeling import MonoInternVL, MonoInternVLOutput


def _register() -> None:
    for model_type, config_cls in (("internvl_chat", MonoInternVLConfig), ("internlm2", InternLM2Config)):
        try:
            AutoConfig.register(model_type, config_cls, exist_ok=True)
        except TypeError:  # older signature without exist_ok
            AutoConfig.register(model_type, config_cls)
    for auto in (AutoModel, AutoModelForCausalLM):
        for config_cls, model_cls in ((MonoInternVLConfig, MonoInternVL), (InternLM2Config, InternLM2ForCausalLM)):
            try:
                auto.register(config_cls, model_cls, exist_ok=True)
            except TypeError:
                auto.register(config_cls, model_cls)


_register()

__all__ = [
    "InternLM2Config",
    "InternLM2ForCausalLM",
    "InternLM2VEForCausalLM",
    "MonoInternVL",
    "MonoInternVLConfig",
    "MonoInternVLOutput",
    "PatchEmbedConfig",
]
