"""The four training stages as data: what each trains, where it starts from, and its defaults (SPEC section 5).

Every parameter of a :class:`mono.MonoInternVL` belongs to exactly one *parameter group* (matched on its
release-layout name); a stage trains a set of groups and freezes the rest:

| stage | what it learns | trainable groups |
|---|---|---|
| ``s1.1`` concept learning | noisy web image-text pairs, caption loss | patch_embed, projector, visual_experts |
| ``s1.2`` semantic learning | precise synthetic captions | same as s1.1 |
| ``s1.3`` alignment learning | task data (captioning, grounding, OCR, VQA) | s1.2 + attention |
| ``s2`` instruction tuning | conversations | everything (or a configured subset) |

``visual_experts`` holds the visual FFN experts (``feed_forward_ve``) and, when the model has them, the visual
attention experts (``attention_ve``). In s1.1 and s1.2 the whole pre-trained LLM (embeddings, text FFNs,
attention, norms, output head) is frozen ("delta tuning"), so its text-only behaviour cannot change.

Defaults: s2 follows the public Mono-InternVL instruction-tuning recipe (lr 4e-5, 3 % warm-up, 6 tiles +
thumbnail, 2048 tokens). The paper's per-stage learning rates and tile caps for s1.x are not in any public source
we could check; the s1.x values below are this project's defaults (a higher learning rate for the newly
initialised visual parameters, as InternVL's projector warm-up uses), and every one can be overridden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["PARAM_GROUPS", "STAGES", "StageSpec", "group_of", "parameter_groups", "set_trainable", "stage_spec"]

# Group name -> regular expression on the release-layout parameter name. Each parameter must match exactly one.
PARAM_GROUPS: dict[str, str] = {
    "patch_embed": r"^vision_model\.",
    "projector": r"^mlp1\.",
    "visual_experts": r"\.(feed_forward_ve|attention_ve)\.",
    "attention": r"\.attention\.(wqkv|wo)\.",
    "text_ffn": r"\.feed_forward\.",
    "norms": r"\.(attention_norm|ffn_norm|norm)\.weight$",
    "embeddings": r"\.tok_embeddings\.",
    "lm_head": r"^language_model\.output\.",
}
_COMPILED = {name: re.compile(pattern) for name, pattern in PARAM_GROUPS.items()}
VISUAL_GROUPS = ("patch_embed", "projector", "visual_experts")


@dataclass(frozen=True)
class StageSpec:
    """One EViP / instruction-tuning stage.

    Attributes:
        name: ``s1.1``, ``s1.2``, ``s1.3`` or ``s2``.
        title: what the stage learns.
        trainable: the parameter groups it trains (all others are frozen).
        data: ``pairs`` (image-text pairs, the caption is supervised) or ``conversations`` (task and chat data,
            assistant answers are supervised).
        init: ``llm`` (a plain LLM checkpoint through ``MonoInternVL.from_llm``) or ``previous`` (the exported
            model of the stage before).
        lr: peak learning rate (AdamW, cosine schedule).
        warmup_ratio: share of the steps spent warming up linearly.
        max_tiles: dynamic-tiling cap per sample (a thumbnail is added when an image has more than one tile).
        max_seq_len: tokens per sample (or per pack).
        loss_weighting: ``token`` (every supervised token weighs 1), ``sample`` (1/n per sample of n tokens),
            ``square`` (1/sqrt(n)); normalised over all ranks and accumulation steps.
    """

    name: str
    title: str
    trainable: tuple[str, ...]
    data: Literal["pairs", "conversations"]
    init: Literal["llm", "previous"]
    lr: float
    warmup_ratio: float
    max_tiles: int
    max_seq_len: int
    loss_weighting: Literal["token", "sample", "square"]


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("s1.1", "concept learning", VISUAL_GROUPS, "pairs", "llm", 2e-4, 0.03, 4, 2048, "token"),
        StageSpec("s1.2", "semantic learning", VISUAL_GROUPS, "pairs", "previous", 1e-4, 0.03, 6, 2048, "token"),
        StageSpec(
            "s1.3", "alignment learning", (*VISUAL_GROUPS, "attention"), "conversations", "previous", 5e-5, 0.03,
            6, 2048, "square",
        ),
        StageSpec("s2", "instruction tuning", tuple(PARAM_GROUPS), "conversations", "previous", 4e-5, 0.03, 6, 2048,
                  "token"),
    )
}


def stage_spec(name: str) -> StageSpec:
    """The stage called ``name`` (``ValueError`` listing the stages otherwise)."""
    key = name.strip().lower()
    if key not in STAGES:
        raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
    return STAGES[key]


def group_of(param_name: str) -> str:
    """The parameter group of a release-layout parameter name (``ValueError`` if none or several match)."""
    hits = [group for group, pattern in _COMPILED.items() if pattern.search(param_name)]
    if len(hits) != 1:
        what = "no parameter group" if not hits else f"several parameter groups ({', '.join(hits)})"
        raise ValueError(
            f"parameter {param_name!r} matches {what}; extend evip.stages.PARAM_GROUPS so every parameter belongs "
            "to exactly one group"
        )
    return hits[0]


def parameter_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """``{group: [parameter names]}`` for every group (empty lists included)."""
    groups: dict[str, list[str]] = {group: [] for group in PARAM_GROUPS}
    for name, _ in model.named_parameters():
        groups[group_of(name)].append(name)
    return groups


def set_trainable(model: torch.nn.Module, groups: tuple[str, ...] | list[str]) -> list[str]:
    """Train exactly the parameters of ``groups`` (``requires_grad``), freeze every other one, and return the
    trainable parameter names. Unknown groups, and groups the model has no parameter of (except the optional
    visual attention experts, which share ``visual_experts``), are errors."""
    unknown = [g for g in groups if g not in PARAM_GROUPS]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; the groups are {', '.join(PARAM_GROUPS)}")
    by_group = parameter_groups(model)
    empty = [g for g in groups if not by_group[g]]
    if empty:
        raise ValueError(f"the model has no parameters in group(s) {empty}")
    wanted = set(groups)
    trainable = []
    for name, param in model.named_parameters():
        train = group_of(name) in wanted
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    return trainable
