"""An exported folder registers its own LMDeploy model: ``lmdeploy serve api_server DIR --trust-remote-code``.

``mono export`` bundles this module into the folder (as ``lmdeploy_register_mono_internvl.py``, next to
``lmdeploy_mono_internvl.py`` and ``lmdeploy_mapping_mono_internvl.py``, generated from :mod:`.models` and
:mod:`.mapping`), and the folder's ``configuration_mono_internvl.py`` calls :func:`register_with_lmdeploy` when it
is imported. LMDeploy imports that file whenever it reads the folder's config with ``trust_remote_code=True``: in
the API server's process, in its engine process (which reads the config itself before building the model), in
``lmdeploy.pipeline``'s process. So LMDeploy's own entry points work on releases without a working Mono-InternVL,
with no LMDeploy file edited and without this package installed::

    lmdeploy serve api_server out_dir --backend pytorch --trust-remote-code --dtype bfloat16
    lmdeploy.pipeline("out_dir", backend_config=PytorchEngineConfig(dtype="bfloat16"), trust_remote_code=True)

The registration is LMDeploy's custom module map (``lmdeploy.pytorch.models.module_map.CUSTOM_MODULE_MAP``, what
``update_custom_module_map`` fills from a file), pointing the folder's architecture names at the bundled
:class:`.models.MonoInternVLChatModel`, which hands any non-Mono InternVL config to LMDeploy's own class.

Nothing happens where LMDeploy is not imported (plain transformers), on 0.6.3 - 0.12.1 (LMDeploy's own
implementation loads the folder), or where the names are mapped already (:func:`mono.deploy.lmdeploy.register`,
or a user's own module map): an explicit registration wins.

Without ``--trust-remote-code`` LMDeploy reads the config as a plain ``PretrainedConfig`` whose nested configs are
dicts, runs none of the folder's code, and fails with ``AttributeError: 'dict' object has no attribute
'hidden_size'`` (0.18). Without ``--backend pytorch`` it picks TurboMind, which lists ``InternVLChatModel`` but has
no Mono-InternVL.

Limits: the registration lives in processes that import the config module. Executor workers that receive the
config by pickling instead (``tp > 1``: LMDeploy's ``mp`` / Ray executors) do not import it; use ``mono serve``
(whose engine config carries the registration into every worker) for those.
"""

from __future__ import annotations

import re
import sys

__all__ = ["ARCHITECTURES", "NATIVE_BROKEN_SINCE", "register_with_lmdeploy"]

# The names LMDeploy's resolver looks up for an exported folder: auto_map["AutoModelForCausalLM"]'s class name
# (InternVLChatModel; MonoInternVL in exports written before it was renamed) and architectures[0].
ARCHITECTURES = ("InternVLChatModel", "MonoInternVL")
# LMDeploy's own Mono-InternVL builds up to 0.12.1 (see mono.deploy.lmdeploy).
NATIVE_BROKEN_SINCE = (0, 12, 2)


def _release(version: str) -> tuple[int, ...] | None:
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(part) for part in found.groups()) if found else None


def register_with_lmdeploy() -> str | None:
    """Map :data:`ARCHITECTURES` to this module's LMDeploy model in this process's LMDeploy, if it needs that.

    Returns the class qualname registered, or None when nothing was done (no LMDeploy imported, a release that
    loads Mono-InternVL natively, a TurboMind-only install, or the names mapped already).

    Raises:
        RuntimeError: the bundled LMDeploy model does not import on the installed LMDeploy (the message names the
            version and the supported ones).
    """
    lmdeploy = sys.modules.get("lmdeploy")
    if lmdeploy is None:
        return None
    version = str(getattr(lmdeploy, "__version__", ""))
    release = _release(version)
    if release is None or release < NATIVE_BROKEN_SINCE:
        return None
    try:
        from lmdeploy.pytorch.models.module_map import CUSTOM_MODULE_MAP
    except ImportError:  # LMDeploy without its PyTorch engine
        return None
    if any(name in CUSTOM_MODULE_MAP for name in ARCHITECTURES):
        return None
    try:
        from .models import MonoInternVLChatModel
    except ImportError as err:
        raise RuntimeError(
            f"this folder's LMDeploy model (Mono-InternVL) does not import on LMDeploy {version}: {err}. It was "
            "written against LMDeploy 0.18 and tested with 0.14 and 0.18; re-export the folder with a newer "
            "mono-internvl or use one of those releases"
        ) from err
    qualname = f"{MonoInternVLChatModel.__module__}.{MonoInternVLChatModel.__qualname__}"
    CUSTOM_MODULE_MAP.update(dict.fromkeys(ARCHITECTURES, qualname))
    return qualname
