"""Chat templates and image-token expansion for Mono-InternVL prompts.

A template turns a conversation into the exact prompt text the model was trained on (SPEC §4). The BOS token
is not part of the rendered text: the tokenizer adds it. Image placeholders (`<image>`) are expanded into
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`; the model routes exactly the
`<IMG_CONTEXT>` positions to its visual expert, so the count must equal the number of visual tokens.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = [
    "IMAGE_PLACEHOLDER",
    "IMG_CONTEXT_TOKEN",
    "IMG_END_TOKEN",
    "IMG_START_TOKEN",
    "TEMPLATES",
    "ChatTemplate",
    "expand_image_placeholders",
    "get_template",
    "image_span",
    "register_template",
]

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"

_ROLES = ("user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """One chat prompt format.

    Every turn is rendered as `prefix + text + turn_end + turn_sep`; the system block is
    `system_template` (with `{system_message}` filled in) followed by `turn_end + turn_sep`.
    """

    name: str
    """Registry key, e.g. "internlm2-chat"."""
    system_template: str
    """Text of the system block before `turn_end`; must contain the field `{system_message}`."""
    system_message: str
    """Default system message, used when `render` is not given one."""
    user_prefix: str
    """Text opening a user turn, e.g. "<|im_start|>user\\n"."""
    assistant_prefix: str
    """Text opening an assistant turn; also the generation prompt."""
    turn_end: str
    """Token text closing every turn (and the system block), e.g. "<|im_end|>"."""
    turn_sep: str = ""
    """Text after each `turn_end`: "" for internlm2-chat, "\\n" for chatml."""
    stop_tokens: tuple[str, ...] = ()
    """Token strings that end generation."""

    def __post_init__(self) -> None:
        if "{system_message}" not in self.system_template:
            raise ValueError(
                f"template {self.name!r}: system_template must contain '{{system_message}}', "
                f"got {self.system_template!r}"
            )
        if not isinstance(self.stop_tokens, tuple):
            raise ValueError(
                f"template {self.name!r}: stop_tokens must be a tuple of strings, got {self.stop_tokens!r}"
            )

    def render(
        self,
        messages: Sequence[tuple[str, str]],
        system_message: Optional[str] = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render a conversation of `(role, text)` pairs into prompt text (without BOS).

        Roles must alternate `user`, `assistant`, `user`, ... starting with `user`. The system block is always
        emitted: `system_message=None` uses the template default, any string (even "") is used verbatim.
        With `add_generation_prompt` the conversation must end with a user turn and the assistant prefix is
        appended so the model continues with its answer.

        Raises:
            ValueError: empty conversation, unknown role, broken alternation (naming the message index), or a
                generation prompt requested after an assistant turn.
        """
        if len(messages) == 0:
            raise ValueError(f"template {self.name!r}: messages is empty; pass at least one user message")
        sys_text = self.system_message if system_message is None else system_message
        # str.replace rather than str.format: braces in the system message or template must stay literal.
        parts = [self.system_template.replace("{system_message}", sys_text), self.turn_end, self.turn_sep]
        for index, message in enumerate(messages):
            if len(message) != 2:
                raise ValueError(f"message {index}: expected a (role, text) pair, got {message!r}")
            role, text = message
            if role not in _ROLES:
                raise ValueError(f"message {index}: role must be 'user' or 'assistant', got {role!r}")
            expected = _ROLES[index % 2]
            if role != expected:
                raise ValueError(
                    f"message {index}: expected role {expected!r} (roles alternate user/assistant starting "
                    f"with user), got {role!r}"
                )
            if not isinstance(text, str):
                raise ValueError(f"message {index}: text must be a str, got {type(text).__name__}")
            prefix = self.user_prefix if role == "user" else self.assistant_prefix
            parts += [prefix, text, self.turn_end, self.turn_sep]
        if add_generation_prompt:
            if messages[-1][0] != "user":
                raise ValueError(
                    f"message {len(messages) - 1}: add_generation_prompt=True needs the conversation to end "
                    "with a user message; drop the last assistant message or pass add_generation_prompt=False"
                )
            parts.append(self.assistant_prefix)
        return "".join(parts)

    def to_jinja(self) -> str:
        """This template as a Hugging Face chat template (Jinja), for ``tokenizer_config.json``'s ``chat_template``.

        ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=g)`` then returns exactly
        :meth:`render` of the same conversation: a leading ``system`` message replaces the default system message
        (which this template bakes in), roles must alternate user/assistant (the template raises otherwise), and
        no BOS is emitted (the tokenizer adds it). Content must be text: image placeholders are expanded before.
        """
        system_prefix, _, system_suffix = self.system_template.partition("{system_message}")

        def lit(text: str) -> str:  # a Jinja string literal; ASCII escapes keep any text (CJK included) intact
            return json.dumps(text)

        end = lit(self.turn_end + self.turn_sep)
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
            f"{{%- else -%}}{{%- set system_message = {lit(self.system_message)} -%}}"
            "{%- set loop_messages = messages -%}{%- endif -%}"
            f"{{{{ {lit(system_prefix)} + system_message + {lit(system_suffix)} + {end} }}}}"
            "{%- for message in loop_messages -%}"
            "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
            "{{ raise_exception('roles must alternate user/assistant starting with user (after an optional "
            "system message)') }}{%- endif -%}"
            "{%- if message['content'] is not string -%}"
            "{{ raise_exception('message content must be text (expand image placeholders first)') }}"
            "{%- endif -%}"
            f"{{%- if message['role'] == 'user' -%}}{{{{ {lit(self.user_prefix)} + message['content'] + {end} }}}}"
            f"{{%- else -%}}{{{{ {lit(self.assistant_prefix)} + message['content'] + {end} }}}}{{%- endif -%}}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {lit(self.assistant_prefix)} }}}}{{%- endif -%}}"
        )


TEMPLATES: dict[str, ChatTemplate] = {}


def register_template(template: ChatTemplate, override: bool = False) -> ChatTemplate:
    """Add `template` to `TEMPLATES` under `template.name` and return it.

    Raises:
        ValueError: a template of that name exists and `override` is False.
    """
    if template.name in TEMPLATES and not override:
        raise ValueError(
            f"chat template {template.name!r} is already registered; pass override=True to replace it"
        )
    TEMPLATES[template.name] = template
    return template


def get_template(name: str, system_message: Optional[str] = None) -> ChatTemplate:
    """Return the registered template `name`, with its default system message replaced if one is given.

    Raises:
        ValueError: no template of that name; the message lists the known names.
    """
    try:
        template = TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown chat template {name!r}; known templates: {known}") from None
    if system_message is not None:
        template = dataclasses.replace(template, system_message=system_message)
    return template


_INTERNVL_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

_internlm2_chat = register_template(
    ChatTemplate(
        name="internlm2-chat",
        system_template="<|im_start|>system\n{system_message}",
        system_message=_INTERNVL_SYSTEM_MESSAGE,
        user_prefix="<|im_start|>user\n",
        assistant_prefix="<|im_start|>assistant\n",
        turn_end="<|im_end|>",
        turn_sep="",
        stop_tokens=("</s>", "<|im_end|>", "<|im_start|>"),
    )
)
# LMDeploy's name for the same format.
register_template(dataclasses.replace(_internlm2_chat, name="internvl2-internlm2"))

register_template(
    ChatTemplate(
        name="chatml",
        system_template="<|im_start|>system\n{system_message}",
        system_message="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        user_prefix="<|im_start|>user\n",
        assistant_prefix="<|im_start|>assistant\n",
        turn_end="<|im_end|>",
        turn_sep="\n",
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
    )
)


def image_span(
    num_tiles: int,
    num_image_token: int,
    *,
    start: str = IMG_START_TOKEN,
    end: str = IMG_END_TOKEN,
    context: str = IMG_CONTEXT_TOKEN,
) -> str:
    """Token text for one image: `<img>` + `<IMG_CONTEXT>` x (num_image_token * num_tiles) + `</img>`.

    `start`, `end`, `context` override the token strings (the release's chat() takes them as arguments).
    """
    for name, value in (("num_tiles", num_tiles), ("num_image_token", num_image_token)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return start + context * (int(num_image_token) * int(num_tiles)) + end


def expand_image_placeholders(
    text: str,
    num_patches_list: Sequence[int],
    num_image_token: int,
    start: str = IMG_START_TOKEN,
    end: str = IMG_END_TOKEN,
    context: str = IMG_CONTEXT_TOKEN,
) -> str:
    """Replace each `<image>` in `text`, left to right, by the token span of the corresponding image.

    `num_patches_list[k]` is the number of tiles (thumbnail included) of image k. If `text` has no
    placeholder but images are given, one `<image>\\n` per image is prefixed first (the release prefixes
    `<image>\\n` to a question without one). The prefix goes at the very start of `text`, so call this on the
    first user message when relying on it; on a rendered prompt it would land before the system block.

    Raises:
        ValueError: the number of placeholders differs from the number of images (both counts are named).
    """
    num_images = len(num_patches_list)
    num_placeholders = text.count(IMAGE_PLACEHOLDER)
    if num_placeholders == 0 and num_images > 0:
        text = (IMAGE_PLACEHOLDER + "\n") * num_images + text
        num_placeholders = num_images
    if num_placeholders != num_images:
        raise ValueError(
            f"text has {num_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {num_images} image(s) were "
            f"given; put exactly one '{IMAGE_PLACEHOLDER}' per image in the text"
        )
    pieces = text.split(IMAGE_PLACEHOLDER)
    out = [pieces[0]]
    for num_tiles, piece in zip(num_patches_list, pieces[1:]):
        out += [image_span(num_tiles, num_image_token, start=start, end=end, context=context), piece]
    return "".join(out)
