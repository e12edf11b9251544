"""The custom module map this project gives LMDeploy's PyTorch engine (LMDeploy >= 0.12.2).

LMDeploy executes this file with ``lmdeploy.pytorch.models.patch.update_custom_module_map(path)`` and merges
``CUSTOM_MODULE_MAP`` (architecture name -> class qualname) over its own module map; its resolver
(``patch._get_model_class``) then finds the entries below for the outer architecture of an exported folder.

- ``InternVLChatModel`` is the release's outer architecture. Our class dispatches on the config: a Mono config
  (``llm_config.architectures == ["InternLM2VEForCausalLM"]``) builds this project's implementation, any other
  InternVL config is handed to LMDeploy's own ``InternVLChatModel`` unchanged. Our class builds its decoder
  directly, so LMDeploy never looks ``InternLM2VEForCausalLM`` up in its module map, where the removed-model
  list of >= 0.15 (``REMOVED_MODEL_MAP``) would reject it; that list is left as it is.
- ``MonoInternVL`` is the class name in the ``auto_map`` of ``mono export`` folders; LMDeploy resolves
  ``auto_map["AutoModelForCausalLM"]`` before ``architectures``.

Use :func:`mono.deploy.lmdeploy.module_map_path` (or :func:`mono.deploy.lmdeploy.engine_config`) rather than
this path directly.
"""

import importlib.util
import sys
from pathlib import Path

# An engine process (spawned or a Ray worker) imports the classes below by name. When this project runs from
# a source tree that is not installed, make the tree importable there too (appended: never shadows anything).
_ROOT = str(Path(__file__).resolve().parents[3])
if importlib.util.find_spec("mono") is None and _ROOT not in sys.path:
    sys.path.append(_ROOT)

from mono.deploy.lmdeploy.autoregister import ARCHITECTURES  # noqa: E402  (after the path set-up above)

MONO_CHAT_MODEL = "mono.deploy.lmdeploy.models.MonoInternVLChatModel"

CUSTOM_MODULE_MAP = dict.fromkeys(ARCHITECTURES, MONO_CHAT_MODEL)
