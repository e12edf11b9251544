"""Serve exported Mono-InternVL folders with LMDeploy's PyTorch engine, including releases that dropped it.

    from PIL import Image
    from mono.deploy import lmdeploy as mld
    pipe = mld.pipeline("out_dir")                  # lmdeploy.pipeline with everything below applied
    pipe((Image.open("cat.png"), "describe it"))    # image first: the prompt chat() builds ("<image>\n" + text)

Supported LMDeploy versions (:data:`SUPPORTED`):

- **0.6.3 - 0.12.1**: LMDeploy implements Mono-InternVL itself; an exported folder loads natively and nothing
  is registered (:func:`needs_registration` is False).
- **0.12.2 - 0.14.x**: LMDeploy still resolves the folder to its own classes, but its ``InternVLChatModel``
  reads ``language_model.lm_head``, which its ``InternLM2VEForCausalLM`` does not have: building the model fails
  with an AttributeError (checked on 0.14.0; the line appeared in 0.12.2). This project's implementation is
  registered instead.
- **>= 0.15.0**: upstream removed it (``REMOVED_MODEL_MAP`` lists ``InternLM2VEForCausalLM`` and its
  ``InternVLChatModel`` lost the Mono branches). This project's implementation is registered.

Registration (:mod:`mono.deploy.lmdeploy.models`, built from LMDeploy's public building blocks) goes through
LMDeploy's custom-module-map mechanism; no LMDeploy file is edited. Written against 0.18.0; tested with 0.14.0
and 0.18.0.

How the registration reaches every process: :func:`register` loads :func:`module_map_path` with
LMDeploy's own ``update_custom_module_map`` in this process, which is where ``pipeline`` builds the model by
default. :func:`engine_config` also sets ``PytorchEngineConfig.custom_module_map`` to that path, the documented
field. LMDeploy 0.18 (and 0.14) copy that field into ``MiscConfig`` but their model agents read
``ModelConfig.custom_module_map``, which nothing sets; so the path is given as a ``str`` that, when unpickled,
loads the map in that process with the same ``update_custom_module_map`` call. The processes that build a model
receive it that way: the spawned engine process of ``api_server`` (``enable_mp_engine``) gets the engine config,
``mp`` and Ray executor workers get ``MiscConfig``.

LMDeploy's own entry points (``lmdeploy serve api_server DIR --trust-remote-code``, ``lmdeploy.pipeline(DIR,
trust_remote_code=True)``) have no option for a module map. For them an exported folder registers itself: its
``configuration_mono_internvl.py`` calls :func:`.autoregister.register_with_lmdeploy` when LMDeploy imports it to
read the config, mapping the architecture to the folder's bundled copy of :mod:`.models` (single-process engines;
see :mod:`.autoregister`). An explicit :func:`register` in the process takes precedence.

Mono-InternVL runs in bfloat16 only (fp16 overflows); :func:`check_dtype` says so for any other dtype. The chat
template is the text of ``internlm2-chat`` (``internvl2-internlm2`` in LMDeploy's naming). Neither LMDeploy
0.14 nor 0.18 registers that name any more, so :func:`chat_template_config` spells the template out from
:mod:`mono.templates`.

LMDeploy is imported lazily: ``import mono`` works without it, and every function that needs it raises an
ImportError naming ``scripts/install_lmdeploy.sh``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# NATIVE_BROKEN_SINCE: from 0.12.2 LMDeploy's InternVLChatModel.__init__ reads language_model.lm_head, which its
# InternLM2VEForCausalLM does not have.
from .autoregister import NATIVE_BROKEN_SINCE

__all__ = [
    "LMDEPLOY_TEMPLATE_NAME",
    "SUPPORTED",
    "TESTED_VERSIONS",
    "chat_template_config",
    "check_dtype",
    "check_folder",
    "engine_config",
    "lmdeploy_version",
    "module_map_path",
    "needs_registration",
    "pipeline",
    "register",
]

SUPPORTED = {
    "native": ">=0.6.3,<0.12.2: LMDeploy's own Mono-InternVL implementation loads the folder; nothing is registered",
    "registered": ">=0.12.2: this project's implementation is registered through a custom module map (LMDeploy's "
                  "own fails to build from 0.12.2 and was removed in 0.15.0)",
}
NATIVE_SINCE = (0, 6, 3)
REMOVED_IN = (0, 15, 0)
# Exercised by tests/mono/test_lmdeploy.py on the CPU, each in a process where this package cannot be imported:
# an exported folder read the way the engine reads it, resolved (0.12.1: LMDeploy's own model; the others: the
# folder's self-registered one; 0.12.2 / 0.14.0: LMDeploy's own fails to build), prefill logits equal to the
# release's. 0.14.0 and 0.18.0 also: this package's registration, its chat template; 0.18.0: registration across
# processes, weight loading. tests/mono/test_lmdeploy_gpu.py runs the installed version on CUDA.
TESTED_VERSIONS = ("0.12.1", "0.12.2", "0.14.0", "0.18.0")
LMDEPLOY_TEMPLATE_NAME = "internvl2-internlm2"
INSTALL_HINT = (
    "install it with `scripts/install_lmdeploy.sh` (LMDeploy's Python code and the few packages it imports) "
    "or `pip install lmdeploy` (with its CUDA dependencies, for serving)"
)
MONO_LLM_ARCHITECTURE = "InternLM2VEForCausalLM"
_FP16_MESSAGE = (
    "Mono-InternVL runs in bfloat16 under LMDeploy; fp16 overflows in the decoder's activations on image prompts "
    "(LMDeploy's own implementation refused it for the same reason): use --dtype bfloat16"
)


def _import_lmdeploy():
    from PIL import ImageFile

    # `import lmdeploy` sets PIL's LOAD_TRUNCATED_IMAGES for the whole process; keep this process's setting
    # (mono.processing reports truncated image files as errors).
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        import lmdeploy
    except ImportError as err:
        raise ImportError(f"LMDeploy is not installed ({err}); {INSTALL_HINT}") from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    return lmdeploy


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def lmdeploy_version() -> str:
    """The installed LMDeploy version (ImportError naming the install script when there is none)."""
    return _import_lmdeploy().__version__


def needs_registration(version: str | None = None) -> bool:
    """True when ``version`` (default: the installed LMDeploy) lacks a working Mono-InternVL: 0.12.2 or newer.

    Raises:
        ValueError: a version before 0.6.3, which has no Mono-InternVL support either way.
    """
    version = version or lmdeploy_version()
    release = _release(version)
    if release < NATIVE_SINCE:
        raise ValueError(
            f"LMDeploy {version} predates Mono-InternVL support (added in 0.6.3); use LMDeploy 0.6.3-0.12.1 "
            "(native) or >= 0.12.2 (registered by this package)"
        )
    return release >= NATIVE_BROKEN_SINCE


def module_map_path() -> str:
    """Absolute path of the module-map file for ``PytorchEngineConfig(custom_module_map=...)``."""
    return str(Path(__file__).resolve().with_name("module_map.py"))


def _our_map() -> dict[str, str]:
    from .module_map import CUSTOM_MODULE_MAP

    return dict(CUSTOM_MODULE_MAP)


def _load_module_map(path: str) -> None:
    """LMDeploy's own loader for custom module maps, skipped when this process has our entries already."""
    from lmdeploy.pytorch.models.module_map import CUSTOM_MODULE_MAP
    from lmdeploy.pytorch.models.patch import update_custom_module_map

    if all(CUSTOM_MODULE_MAP.get(k) == v for k, v in _our_map().items()):
        return
    update_custom_module_map(path)


class _ModuleMapPath(str):
    """:func:`module_map_path` as a ``str`` that loads the module map in whichever process unpickles it.

    LMDeploy 0.18 pickles the engine config into its engine process and ``MiscConfig`` (which carries
    ``custom_module_map``) into every executor worker, but never calls ``update_custom_module_map`` for it there
    (0.14 has the same gap); unpickling this value does, through :func:`_registered_module_map_path`.
    """

    __slots__ = ()

    def __reduce__(self):
        return (_registered_module_map_path, (str(self),))


def _registered_module_map_path(path: str) -> _ModuleMapPath:
    _load_module_map(path)
    return _ModuleMapPath(path)


def register() -> bool:
    """Make this process's LMDeploy resolve Mono-InternVL folders to this project's implementation.

    Idempotent, edits no LMDeploy file. Returns True when the registration is in effect (LMDeploy >= 0.12.2) and
    False on 0.6.3-0.12.1, which load the folder natively.
    """
    if not needs_registration():
        return False
    _load_module_map(module_map_path())
    return True


def check_dtype(dtype: Any) -> str:
    """``"bfloat16"`` for a bfloat16 dtype (string or ``torch.dtype``) or ``"auto"``; ValueError otherwise.

    ``"auto"`` is pinned to bfloat16: LMDeploy's own ``auto`` picks float16 for a float32 checkpoint.
    """
    name = str(dtype).removeprefix("torch.")
    if name in ("float16", "half", "fp16"):
        raise ValueError(_FP16_MESSAGE)
    if name not in ("bfloat16", "bf16", "auto"):
        raise ValueError(
            f"dtype {dtype!r}: LMDeploy runs Mono-InternVL in bfloat16 only (its PyTorch engine takes 'auto', "
            "'float16' or 'bfloat16', and fp16 overflows): use --dtype bfloat16"
        )
    return "bfloat16"


def engine_config(**overrides: Any):
    """A ``PytorchEngineConfig`` for Mono-InternVL: ``dtype="bfloat16"`` and, on LMDeploy >= 0.12.2, our module map.

    ``overrides`` are other ``PytorchEngineConfig`` fields (``session_len``, ``tp``, ``cache_max_entry_count``,
    ...); ``dtype`` must be bfloat16 (:func:`check_dtype`).
    """
    _import_lmdeploy()
    from lmdeploy import PytorchEngineConfig

    fields = dict(overrides)
    fields["dtype"] = check_dtype(fields.get("dtype", "bfloat16"))
    if needs_registration():
        if fields.get("custom_module_map") not in (None, module_map_path()):
            raise ValueError(
                f"custom_module_map={fields['custom_module_map']!r}: LMDeploy loads one custom module map per "
                f"engine and Mono-InternVL needs {module_map_path()}; merge your entries into a copy of it"
            )
        fields["custom_module_map"] = _ModuleMapPath(module_map_path())
    known = {f.name for f in dataclasses.fields(PytorchEngineConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown PytorchEngineConfig field(s) {unknown}; LMDeploy {lmdeploy_version()} has "
                         f"{sorted(known)}")
    return PytorchEngineConfig(**fields)


def chat_template_config(model_dir: str | Path | None = None, system_message: str | None = None):
    """LMDeploy's ``ChatTemplateConfig`` for the ``internlm2-chat`` prompt format, spelled out field by field.

    The template name and system message come from ``model_dir``'s ``config.json`` (``template``,
    ``system_message``) when given, else the release defaults; ``system_message`` overrides both. The name
    is registered in LMDeploy's template registry as a plain ``BaseChatTemplate``, as its
    ``ChatTemplateConfig.from_json`` does for unknown names.
    """
    return _template_config(model_dir, system_message)


def _template_config(model_dir: str | Path | None, system_message: str | None):
    _import_lmdeploy()
    from lmdeploy.model import MODELS, BaseChatTemplate, ChatTemplateConfig

    from ...templates import get_template

    name, default_system = "internlm2-chat", None
    if model_dir is not None:
        config = _read_config(Path(model_dir))
        name = config.get("template") or name
        default_system = config.get("system_message")
    template = get_template(name, system_message if system_message is not None else default_system)
    system_prefix, _, system_suffix = template.system_template.partition("{system_message}")
    if system_suffix:
        raise ValueError(f"template {name!r}: LMDeploy's templates need the system message at the end of "
                         f"system_template, got {template.system_template!r}")
    model_name = LMDEPLOY_TEMPLATE_NAME if name in ("internlm2-chat", LMDEPLOY_TEMPLATE_NAME) else f"mono-{name}"
    if model_name not in MODELS.module_dict:
        MODELS.register_module(model_name, module=BaseChatTemplate)
    end = template.turn_end + template.turn_sep
    return ChatTemplateConfig(
        model_name=model_name, system=system_prefix, meta_instruction=template.system_message, eosys=end,
        user=template.user_prefix, eoh=end, assistant=template.assistant_prefix, eoa=template.turn_end,
        separator=template.turn_sep, stop_words=list(template.stop_tokens),
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {folder} is not an exported model folder "
                                "(write one with `mono export CHECKPOINT OUT_DIR`)") from None
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def check_folder(model_dir: str | Path) -> Path:
    """``model_dir`` as a Mono-InternVL folder LMDeploy can load, or an error saying what is wrong.

    LMDeploy reads the nested configs as objects through transformers' ``AutoConfig``, which only the folder's
    remote code (``auto_map``, loaded with ``trust_remote_code=True``) provides, or :func:`mono.register_auto_classes`
    in this process; without either the config arrives as nested dicts and the engine fails late.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder = Path(model_dir)
    config = _read_config(folder)
    archs = (config.get("llm_config") or {}).get("architectures") or []
    if archs[:1] != [MONO_LLM_ARCHITECTURE]:
        raise ValueError(f"{folder / 'config.json'}: llm_config.architectures is {archs}, not "
                         f"[{MONO_LLM_ARCHITECTURE!r}]; not a Mono-InternVL folder")
    if "internvl_chat" not in CONFIG_MAPPING and "AutoConfig" not in (config.get("auto_map") or {}):
        raise ValueError(f"{folder / 'config.json'} has no auto_map.AutoConfig: LMDeploy needs the folder's remote "
                         "code to read the nested configs; write the folder with `mono export CHECKPOINT OUT_DIR`")
    return folder


def pipeline(model_dir: str | Path, backend_config: Any = None, chat_template_config: Any = None,
             trust_remote_code: bool = True, **kwargs: Any):
    """``lmdeploy.pipeline`` for an exported folder, with the registration, bfloat16 and chat template applied.

    ``backend_config`` must be a ``PytorchEngineConfig`` (default: :func:`engine_config`); a given one is
    checked for bfloat16 and gets our module map. ``trust_remote_code`` stays True: the folder's remote code is
    this project's own (written by ``mono export``) and LMDeploy needs it to read the config. Other keyword
    arguments go to ``lmdeploy.pipeline``.
    """
    lmdeploy = _import_lmdeploy()
    from lmdeploy import PytorchEngineConfig

    folder = check_folder(model_dir)
    register()
    if backend_config is None:
        backend_config = engine_config()
    elif not isinstance(backend_config, PytorchEngineConfig):
        raise ValueError(f"backend_config must be a PytorchEngineConfig (Mono-InternVL runs on LMDeploy's PyTorch "
                         f"engine), got {type(backend_config).__name__}")
    else:
        fields = {f.name: getattr(backend_config, f.name) for f in dataclasses.fields(backend_config)}
        backend_config = engine_config(**fields)
    if chat_template_config is None:
        chat_template_config = _template_config(folder, None)
    return lmdeploy.pipeline(str(folder), backend_config=backend_config, chat_template_config=chat_template_config,
                             trust_remote_code=trust_remote_code, **kwargs)
