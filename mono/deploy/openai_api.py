"""The part of the OpenAI chat-completions protocol that ``mono`` speaks, as a client and as a server.

A request's ``messages`` are turned into what :meth:`mono.MonoInternVL.chat` takes: a system message, the
earlier ``(question, answer)`` turns, the last question, and the images in order. Images arrive as content
parts ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``; each image of a user turn
becomes an ``<image>\\n`` placeholder in front of that turn's text, which is what LMDeploy does for InternVL.
Every error names the message index (and part index) that is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..templates import IMAGE_PLACEHOLDER

__all__ = ["ChatRequest", "ProtocolError", "image_part", "parse_messages", "sse", "user_message"]

ROLES = ("system", "user", "assistant")


class ProtocolError(ValueError):
    """A request that does not follow the protocol; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ChatRequest:
    """A conversation in the shape :meth:`MonoInternVL.chat` takes."""

    question: str
    history: list[tuple[str, str]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    system: str | None = None


def image_part(image: Union[str, Path, bytes]) -> dict[str, Any]:
    """An ``image_url`` content part holding ``image`` (a file path or encoded bytes) as a base64 data URL."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        data = path.read_bytes()
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    else:
        data, mime = bytes(image), "application/octet-stream"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def user_message(text: str, images: list[Union[str, Path, bytes]] = ()) -> dict[str, Any]:
    """A user message: the images first (as data URLs), then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*(image_part(i) for i in images), {"type": "text", "text": text}]}


def _decode_data_url(url: Any, where: str) -> bytes:
    if not isinstance(url, str):
        raise ProtocolError(f"{where}: image_url.url must be a string, got {type(url).__name__}")
    if not url.startswith("data:"):
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise ProtocolError(
            f"{where}: only data: URLs are accepted (this server fetches nothing); got {shown!r}. "
            "Send the image inline: data:image/png;base64,<...>"
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ProtocolError(f"{where}: a data URL must look like data:<mime>;base64,<payload>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"{where}: the base64 payload does not decode ({exc})") from None
    if not data:
        raise ProtocolError(f"{where}: the image is empty")
    return data


def _split_content(content: Any, where: str, allow_images: bool) -> tuple[str, list[bytes]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ProtocolError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where} part {j}"
        if not isinstance(part, dict) or "type" not in part:
            raise ProtocolError(f"{at}: a content part must be an object with a 'type'")
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ProtocolError(f"{at}: a text part needs a string 'text'")
            texts.append(part["text"])
        elif kind == "image_url":
            if not allow_images:
                raise ProtocolError(f"{at}: images are only accepted in user messages")
            ref = part.get("image_url")
            images.append(_decode_data_url(ref.get("url") if isinstance(ref, dict) else ref, at))
        else:
            raise ProtocolError(f"{at}: unsupported content part type {kind!r} (use 'text' or 'image_url')")
    return "\n".join(texts), images


def parse_messages(messages: Any) -> ChatRequest:
    """Turn OpenAI ``messages`` into a :class:`ChatRequest`.

    Accepted: an optional first ``system`` message, then user/assistant turns alternating, ending with a user
    message. A user turn's images become ``<image>\\n`` placeholders in front of its text unless the text already
    holds exactly as many ``<image>`` placeholders as the turn has images.
    """
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty list")
    system = None
    turns: list[tuple[str, str]] = []
    images: list[bytes] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ProtocolError(f"{where}: must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ProtocolError(f"{where}: role {role!r} is not one of {ROLES}")
        if role == "system":
            if i != 0:
                raise ProtocolError(f"{where}: a system message may only come first")
            system, _ = _split_content(message.get("content", ""), where, allow_images=False)
            continue
        expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
        if role != expected:
            raise ProtocolError(f"{where}: expected a {expected} message here (user and assistant turns alternate)")
        text, turn_images = _split_content(message.get("content", ""), where, allow_images=role == "user")
        if turn_images and text.count(IMAGE_PLACEHOLDER) != len(turn_images):
            if IMAGE_PLACEHOLDER in text:
                raise ProtocolError(
                    f"{where}: the text holds {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) but "
                    f"the message has {len(turn_images)} image(s)"
                )
            text = (IMAGE_PLACEHOLDER + "\n") * len(turn_images) + text
        elif role == "user" and IMAGE_PLACEHOLDER in text and not turn_images:
            raise ProtocolError(f"{where}: the text holds {IMAGE_PLACEHOLDER} but the message carries no image")
        images += turn_images
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ProtocolError("the last message must be a user message")
    pairs = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return ChatRequest(question=turns[-1][1], history=pairs, images=images, system=system)


def sse(payload: Union[dict[str, Any], str]) -> bytes:
    """One server-sent event: ``data: <json>`` (or the literal ``[DONE]``) and a blank line."""
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n".encode()
