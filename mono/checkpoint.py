"""Checkpoint layout checks: what a release-layout folder must hold, read from safetensors headers only.

A Mono-InternVL folder holds ``config.json`` and either ``model.safetensors`` or
``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``. Before any weight is read,
:func:`validate_checkpoint` compares every stored name and shape with what the config implies and lists all
missing, unexpected and mis-shaped tensors at once (name and shape), instead of failing on the first.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from .configuration import MonoInternVLConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-persistent rotary caches some InternLM2 exports still carry; loaders (LMDeploy too) skip them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the config; the message lists every offending name and shape."""


def expected_shapes(config: MonoInternVLConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape a model built from ``config`` has (built on the meta device)."""
    from .modeling import MonoInternVL

    with torch.device("meta"):
        model = MonoInternVL(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def stored_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of all tensors in a checkpoint folder, from the safetensors headers."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointMismatchError(f"{index_path}: not a safetensors index ({err})") from err
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index_path} lists {name}, which is missing from {folder}")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointMismatchError(f"{path}: unreadable safetensors file ({err})") from err
    if weight_map is not None:
        listed_elsewhere = [k for k, v in weight_map.items() if k not in shapes]
        if listed_elsewhere:
            raise CheckpointMismatchError(f"{index_path} lists tensors absent from their shards: {listed_elsewhere[:10]}")
    return shapes


def validate_checkpoint(folder: str, config: MonoInternVLConfig) -> None:
    """Raise :class:`CheckpointMismatchError` listing every missing, unexpected and mis-shaped tensor."""
    expected = expected_shapes(config)
    stored = {k: v for k, v in stored_shapes(folder).items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if not (missing or unexpected or misshaped):
        return
    lines = [f"checkpoint {folder} does not match its config.json:"]
    lines += [f"  missing    {k} {expected[k]}" for k in missing]
    lines += [f"  unexpected {k} {stored[k]}" for k in unexpected]
    lines += [f"  mis-shaped {k}: stored {stored[k]}, config implies {expected[k]}" for k in misshaped]
    raise CheckpointMismatchError("\n".join(lines))
