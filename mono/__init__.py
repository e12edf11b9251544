"""Mono-InternVL: a native multimodal LLM (patch embedding + visual FFN experts in every decoder layer).

Public names: :class:`MonoInternVL`, :class:`MonoInternVLConfig`; the decoder :class:`InternLM2VEForCausalLM`;
:mod:`mono.processing` (tiling, ``load_image``), :mod:`mono.templates` (chat templates),
:mod:`mono.tokenization` (``load_tokenizer``).

Importing ``mono`` registers the decoder with transformers (``AutoConfig`` for ``model_type`` ``internlm2``, which
transformers does not ship, and ``AutoModel`` / ``AutoModelForCausalLM`` for both config classes). It does not
register the outer ``internvl_chat`` type with ``AutoConfig``: transformers prefers a locally registered config
class over a folder's own remote code even with ``trust_remote_code=True``, so that would hijack every other
InternVL checkpoint loaded in the same process (LMDeploy serving a normal InternVL, say). Load Mono-InternVL
folders with ``MonoInternVL.from_pretrained(path)``, or call :func:`register_auto_classes` to make
``AutoModel.from_pretrained(path)`` pick this package's classes for ``internvl_chat`` folders in this process.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import InternLM2Config, MonoInternVLConfig, PatchEmbedConfig
from .internlm2 import InternLM2ForCausalLM, InternLM2VEForCausalLM
from .modeling import MonoInternVL, MonoInternVLOutput


def _register_config(model_type: str, config_cls: type) -> None:
    try:
        AutoConfig.register(model_type, config_cls, exist_ok=True)
    except TypeError:  # older signature without exist_ok
        AutoConfig.register(model_type, config_cls)


def _register() -> None:
    _register_config("internlm2", InternLM2Config)
    for auto in (AutoModel, AutoModelForCausalLM):
        for config_cls, model_cls in ((MonoInternVLConfig, MonoInternVL), (InternLM2Config, InternLM2ForCausalLM)):
            try:
                auto.register(config_cls, model_cls, exist_ok=True)
            except TypeError:
                auto.register(config_cls, model_cls)


def register_auto_classes() -> None:
    """Register ``internvl_chat`` with transformers' ``AutoConfig`` too, for this process.

    Afterwards ``AutoConfig`` / ``AutoModel.from_pretrained(folder)`` use :class:`MonoInternVLConfig` and
    :class:`MonoInternVL` for every ``internvl_chat`` folder, the release's and this project's exports alike, and
    ahead of the folder's remote code even with ``trust_remote_code=True`` (transformers' rule for locally
    registered classes). Non-Mono InternVL folders then fail to load in this process: call this only where every
    ``internvl_chat`` folder is a Mono-InternVL one. Idempotent.
    """
    _register_config("internvl_chat", MonoInternVLConfig)


_register()

__all__ = [
    "InternLM2Config",
    "InternLM2ForCausalLM",
    "InternLM2VEForCausalLM",
    "MonoInternVL",
    "MonoInternVLConfig",
    "MonoInternVLOutput",
    "PatchEmbedConfig",
    "register_auto_classes",
]
