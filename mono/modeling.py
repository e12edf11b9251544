"""``MonoInternVL``: patch embedding + projector + routed InternLM2 decoder, in the release's checkpoint layout.

Legend: B batch, L tokens, N tiles, Q tokens per tile, D decoder width.

The module tree is the release's (``vision_model.embeddings``, ``mlp1``, ``language_model.model``,
``language_model.output``), so ``save_pretrained`` writes, and ``from_pretrained`` reads, exactly the release's
parameter names and shapes; ``config.json`` is written as ``InternVLChatModel`` with
``llm_config.architectures = ["InternLM2VEForCausalLM"]``, the switch LMDeploy and vLLM dispatch on.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from . import checkpoint as ckpt
from .configuration import InternLM2Config, MonoInternVLConfig
from .internlm2 import (
    InternLM2PreTrainedModel, InternLM2VEForCausalLM, causal_lm_loss, check_loss_inputs, max_context_length,
)
from .templates import IMAGE_PLACEHOLDER, expand_image_placeholders, get_template
from .tokenization import left_padded
from .vision import PatchEmbeddings, PatchEmbedModel, build_projector, pixel_shuffle


@dataclass
class MonoInternVLOutput(ModelOutput):
    """``logits (B, L, V)`` fp32, ``loss`` when labels were given, the KV cache, and the routing mask ``(B, L)``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    visual_token_mask: torch.Tensor | None = None


class MonoInternVLPreTrainedModel(PreTrainedModel):
    config_class = MonoInternVLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["InternLM2DecoderLayer", "PatchEmbedModel"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PatchEmbeddings):
            std = self.config.vision_config.initializer_range
            module.class_embedding.normal_(0.0, std)
            module.position_embedding.normal_(0.0, std)
            module.patch_embedding.weight.normal_(0.0, std)
            module.patch_embedding.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        else:
            # Decoder modules (and the projector's Linears) share the decoder's initialiser.
            InternLM2PreTrainedModel._init_weights(self.language_model, module)


class MonoInternVL(MonoInternVLPreTrainedModel, GenerationMixin):
    """Mono-InternVL chat model.

    Construction: ``MonoInternVL(config)``, ``MonoInternVL.from_pretrained(folder)`` (release layout) or
    :meth:`from_llm` (a plain decoder LLM gains patch embedding, projector and visual experts).
    """

    def __init__(self, config: MonoInternVLConfig) -> None:
        super().__init__(config)
        self.vision_model = PatchEmbedModel(config.vision_config)
        self.mlp1 = build_projector(config)
        self.language_model = InternLM2VEForCausalLM(config.llm_config)
        self.system_message: str | None = config.system_message
        self.post_init()

    # ----------------------------------------------------------------------------------------- properties
    @property
    def num_image_token(self) -> int:
        """Tokens per tile (256 for 448 px tiles, patch 14, pixel shuffle 0.5)."""
        return self.config.tokens_per_tile

    @property
    def img_context_token_id(self) -> int | None:
        return self.config.img_context_token_id

    @img_context_token_id.setter
    def img_context_token_id(self, value: int | None) -> None:
        self.config.img_context_token_id = value

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.get_output_embeddings()

    # ----------------------------------------------------------------------------------------- vision
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` tiles -> ``(N, Q, D)`` visual tokens for the decoder."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (tiles, 3, H, W), got {tuple(pixel_values.shape)}")
        patches = self.vision_model(pixel_values)  # (N, G*G, Cv)
        n, p, c = patches.shape
        g = int(round(p**0.5))
        if g * g != p:
            raise ValueError(f"tiles must be square, got {pixel_values.shape[-2]}x{pixel_values.shape[-1]} pixels")
        shuffled = pixel_shuffle(patches.reshape(n, g, g, c), self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(shuffled.reshape(n, -1, shuffled.shape[-1]))

    def _embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_flags: torch.Tensor | None,
        visual_features: torch.Tensor | None = None,
        decoding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Token embeddings with ``<IMG_CONTEXT>`` rows replaced by visual tokens, the ``(B, L)`` visual mask
        and the number of visual tokens (a host int: the routed layers slice by it without a device sync)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if decoding:
            return embeds, None, 0  # generated tokens always take the text expert
        ctx_id = self.img_context_token_id
        if pixel_values is None and visual_features is None:
            if ctx_id is not None and bool((input_ids == ctx_id).any()):
                raise ValueError(
                    f"input_ids contain {int((input_ids == ctx_id).sum())} <IMG_CONTEXT> tokens (id {ctx_id}) but no "
                    "pixel_values were given; pass the image tiles or remove the image spans"
                )
            return embeds, None, 0
        if ctx_id is None:
            raise ValueError(
                "img_context_token_id is not set: set config.img_context_token_id (or call chat(), which reads it "
                "from the tokenizer) before passing pixel_values"
            )
        feats = visual_features if visual_features is not None else self.extract_feature(pixel_values)
        if image_flags is not None:
            # Dummy tiles of text-only samples (flag 0) are dropped, as the release does. The flags are read on
            # the host (data loaders build them there); the decoder layers themselves never sync.
            keep = image_flags.reshape(-1).to("cpu") == 1
            if not bool(keep.all()):
                feats = feats[keep.nonzero().reshape(-1).to(feats.device)]
        mask = input_ids == ctx_id
        num_slots = int(mask.sum())
        num_feats = feats.shape[0] * feats.shape[1]
        if num_slots != num_feats:
            raise ValueError(
                f"{num_slots} <IMG_CONTEXT> tokens (id {ctx_id}) in input_ids but {feats.shape[0]} tiles x "
                f"{feats.shape[1]} tokens = {num_feats} visual tokens; each image needs "
                f"{self.num_image_token} context tokens per tile"
            )
        embeds = embeds.masked_scatter(mask[..., None], feats.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        return embeds, mask, num_slots

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        past_key_values: Any = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MonoInternVLOutput:
        """Logits for ``input_ids`` (whose ``<IMG_CONTEXT>`` tokens take the tiles' visual tokens in order).

        ``pixel_values (N, 3, S, S)`` holds every tile of the batch in order; ``image_flags (N,)`` marks dummy
        tiles (0) to drop. ``labels`` (-100 = ignored) give the next-token loss. ``logits_to_keep`` limits the
        logits to some positions (last k, indices, or a boolean ``(B, L)`` mask; see
        :meth:`~mono.internlm2.InternLM2ForCausalLM.forward`).
        """
        if input_ids is None:
            raise ValueError("input_ids is required")
        check_loss_inputs(labels, logits_to_keep)
        decoding = past_key_values is not None and past_key_values.get_seq_length() > 0 and pixel_values is None
        embeds, mask, num_visual = self._embed(input_ids, pixel_values, image_flags, decoding=decoding)
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache if use_cache is not None else False,
            visual_token_mask=mask,
            num_visual_tokens=num_visual if mask is not None else None,
            logits_to_keep=logits_to_keep,
        )
        loss = causal_lm_loss(out.logits, labels) if labels is not None else None
        return MonoInternVLOutput(loss=loss, logits=out.logits, past_key_values=out.past_key_values, visual_token_mask=mask)

    # ----------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate with a KV cache; returns only the new tokens ``(B, new)``, like the release.

        The prompt (text and visual tokens) is prefilled once through the routed decoder; every generated token
        then runs through the text expert. ``generate_kwargs`` are Hugging Face generation options
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``eos_token_id``, ...).
        """
        if input_ids is None:
            raise ValueError("input_ids is required")
        limit = max_context_length(self.config.llm_config)
        if input_ids.shape[1] > limit:  # before any vision work
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens exceeds the model's context of {limit} tokens")
        embeds, mask, _ = self._embed(input_ids, pixel_values, None, visual_features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("pad_token_id", self._pad_token_id())
        # The checkpoint's generation_config.json (model.generation_config) unless the caller passes one, updated
        # with the generation options given here (one object: transformers warns when given both).
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        other = config.update(use_cache=True, **generate_kwargs)
        return self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            visual_token_mask=mask,
            generation_config=config,
            **other,
        )

    def _pad_token_id(self) -> int:
        pad = self.config.llm_config.pad_token_id
        return int(pad) if pad is not None else 0

    # ----------------------------------------------------------------------------------------- chat
    def _template(self):
        return get_template(self.config.template, system_message=self.system_message)

    def _render(
        self, history: list[tuple[str, str]], question: str, num_patches_list: list[int], tokens: tuple[str, str, str]
    ) -> str:
        """The full prompt; ``<image>`` placeholders are expanded inside user turns only, images taken in order."""
        turns: list[tuple[str, str]] = []
        for old_q, old_a in history:
            turns += [("user", old_q), ("assistant", old_a)]
        turns.append(("user", question))
        found = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
        if found != len(num_patches_list):
            raise ValueError(
                f"the conversation's user turns hold {found} {IMAGE_PLACEHOLDER} placeholder(s) but "
                f"{len(num_patches_list)} image(s) were given (tiles per image: {num_patches_list}); pass the same "
                "pixel_values on every turn of an image conversation"
            )
        remaining = list(num_patches_list)
        expanded = []
        for role, text in turns:
            k = text.count(IMAGE_PLACEHOLDER) if role == "user" else 0
            if k:
                text = expand_image_placeholders(text, remaining[:k], self.num_image_token, *tokens)
                remaining = remaining[k:]
            expanded.append((role, text))
        return self._template().render(expanded)

    def _tokenize_prompts(self, tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
        device = self.get_input_embeddings().weight.device
        return {k: v.to(device) for k, v in left_padded(tokenizer, prompts).items()}

    def _stop_ids(self, tokenizer) -> list[int]:
        # Membership in the vocabulary, not "id != unk": some tokenizers (SmolLM2) use a stop token as unk.
        ids = []
        vocab = tokenizer.get_vocab()
        for tok in self._template().stop_tokens:
            tid = vocab.get(tok)
            if tid is not None and tid not in ids:
                ids.append(tid)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return ids

    def _bind_tokenizer(self, tokenizer, img_context_token: str) -> None:
        ctx = tokenizer.get_vocab().get(img_context_token)
        if ctx is None:
            raise ValueError(
                f"the tokenizer has no {img_context_token!r} token; load it with mono.tokenization.load_tokenizer, "
                "which adds the nine special tokens"
            )
        if ctx >= self.config.llm_config.vocab_size:
            raise ValueError(
                f"{img_context_token!r} has id {ctx} but the model's vocabulary has "
                f"{self.config.llm_config.vocab_size} rows; resize the embeddings (MonoInternVL.from_llm does)"
            )
        self.img_context_token_id = ctx

    def _decode(self, tokenizer, tokens: torch.Tensor) -> list[str]:
        sep = self._template().turn_end
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [t.split(sep)[0].strip() for t in texts]

    def chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict[str, Any],
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: list[int] | None = None,
        IMG_START_TOKEN: str = "<img>",
        IMG_END_TOKEN: str = "</img>",
        IMG_CONTEXT_TOKEN: str = "<IMG_CONTEXT>",
        verbose: bool = False,
    ):
        """One chat turn, with the release's signature; ``pixel_values=None`` is a text-only turn.

        ``question`` may hold ``<image>`` placeholders (one per image in ``num_patches_list``, default: one image
        with all tiles); without one, ``<image>\\n`` is put before the first user turn. ``history`` is a list of
        ``(question, answer)`` pairs as returned with ``return_history=True``; pass the same ``pixel_values`` on
        every turn of an image conversation. Returns the answer, or ``(answer, history)``.
        """
        self._bind_tokenizer(tokenizer, IMG_CONTEXT_TOKEN)
        history = [] if history is None else list(history)
        if pixel_values is not None and num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]]
        num_patches_list = num_patches_list or []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(
                f"num_patches_list {num_patches_list} sums to {sum(num_patches_list)} tiles but pixel_values holds "
                f"{pixel_values.shape[0]}"
            )
        placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history) + question.count(IMAGE_PLACEHOLDER)
        if num_patches_list and placeholders == 0:
            prefix = (IMAGE_PLACEHOLDER + "\n") * len(num_patches_list)
            if history:
                history[0] = (prefix + history[0][0], history[0][1])
            else:
                question = prefix + question
        prompt = self._render(history, question, num_patches_list, (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN))
        inputs = self._tokenize_prompts(tokenizer, [prompt])
        gen = dict(generation_config)
        gen["eos_token_id"] = self._stop_ids(tokenizer)
        pixel_values = None if pixel_values is None else pixel_values.to(self.dtype).to(inputs["input_ids"].device)
        tokens = self.generate(pixel_values=pixel_values, **inputs, **gen)
        answer = self._decode(tokenizer, tokens)[0]
        history.append((question, answer))
        if verbose:
            print(f"{question}\n{answer}")
        return (answer, history) if return_history else answer

    def batch_chat(
        self,
        tokenizer,
        pixel_values: torch.Tensor | None,
        image_counts: list[int] | None = None,
        questions: list[str] | None = None,
        generation_config: dict[str, Any] | None = None,
        history: None = None,
        return_history: bool = False,
        IMG_START_TOKEN: str = "<img>",
        IMG_END_TOKEN: str = "</img>",
        IMG_CONTEXT_TOKEN: str = "<IMG_CONTEXT>",
        num_patches_list: list[int] | None = None,
    ) -> list[str]:
        """Independent single-turn questions in one left-padded batch (release signature).

        ``image_counts[i]`` is the number of tiles of question ``i``'s image in ``pixel_values`` (0 = text only);
        ``num_patches_list`` is accepted as the InternVL2-style keyword for the same list.
        """
        if history is not None or return_history:
            raise ValueError("batch_chat answers single-turn questions; use chat() for multi-turn conversations")
        if image_counts is not None and num_patches_list is not None:
            raise ValueError("pass image_counts or num_patches_list, not both")
        image_counts = image_counts if image_counts is not None else num_patches_list
        if questions is None or generation_config is None:
            raise ValueError("batch_chat needs questions and generation_config")
        self._bind_tokenizer(tokenizer, IMG_CONTEXT_TOKEN)
        image_counts = list(image_counts) if image_counts is not None else [0] * len(questions)
        if len(image_counts) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(image_counts)} image_counts")
        total = pixel_values.shape[0] if pixel_values is not None else 0
        if sum(image_counts) != total:
            raise ValueError(f"image_counts sum to {sum(image_counts)} tiles but pixel_values holds {total}")
        prompts = []
        for question, count in zip(questions, image_counts):
            patches = [count] if count else []
            if patches and IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER + "\n" + question
            prompts.append(self._render([], question, patches, (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)))
        inputs = self._tokenize_prompts(tokenizer, prompts)
        gen = dict(generation_config)
        gen["eos_token_id"] = self._stop_ids(tokenizer)
        pixel_values = None if pixel_values is None else pixel_values.to(self.dtype).to(inputs["input_ids"].device)
        tokens = self.generate(pixel_values=pixel_values, **inputs, **gen)
        return self._decode(tokenizer, tokens)

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Write config + safetensors (sharded with an index past ``max_shard_size``, default 5GB) in the release layout."""
        kwargs.setdefault("max_shard_size", "5GB")
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load a local folder in the release layout; names and shapes are checked first, mismatches listed."""
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} is not a folder; MonoInternVL loads local checkpoints only")
        config = kwargs.pop("config", None) or MonoInternVLConfig.from_pretrained(folder)
        ckpt.validate_checkpoint(folder, config)
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(folder, *args, config=config, **kwargs)

    # ----------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_llm(cls, llm: Any, **kwargs: Any) -> MonoInternVL:
        """Build a Mono model from a plain decoder LLM; see :func:`mono.conversion.mono_from_llm`."""
        from .conversion import mono_from_llm

        return mono_from_llm(llm, **kwargs)


InternVLChatModel = MonoInternVL
"""The release's class name (its ``config.json`` architecture): exported ``auto_map`` entries name it, because
LMDeploy 0.6.3-0.12.1 resolve a folder's ``auto_map`` by class name and know only ``InternVLChatModel``."""

__all__ = ["InternLM2Config", "InternVLChatModel", "MonoInternVL", "MonoInternVLConfig", "MonoInternVLOutput"]
