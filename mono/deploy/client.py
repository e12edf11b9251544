"""A small client for OpenAI-compatible chat servers (``lmdeploy serve api_server``, ``mono serve``).

Standard library only. ``ServerClient(url).chat(messages)`` returns the answer; ``stream(messages)`` yields
:class:`StreamEvent` s with arrival times, which ``mono bench-serve`` uses for time to first token.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator, Optional

__all__ = ["ServerClient", "ServerError", "StreamEvent", "is_url"]


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


class ServerError(RuntimeError):
    """The server could not be reached, or answered with an error; the message names the URL."""


@dataclass
class StreamEvent:
    """One streamed chunk: its text, and when it arrived (``time.perf_counter``)."""

    text: str
    time: float
    finish_reason: Optional[str] = None
    completion_tokens: Optional[int] = None
    """Set on the closing usage chunk (servers that honour ``stream_options.include_usage``)."""


class ServerClient:
    """Talks to ``<url>/v1/models`` and ``<url>/v1/chat/completions``."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 600.0) -> None:
        if not is_url(url):
            raise ValueError(f"server URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[: -len("/v1")]
        self.api_key = api_key
        self.timeout = timeout
        self._model: Optional[str] = None

    # ------------------------------------------------------------------------------------------ transport
    def _request(self, path: str, payload: Optional[dict[str, Any]] = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if data is None else "POST")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            try:
                detail = json.loads(body).get("error", body)
                detail = detail.get("message", detail) if isinstance(detail, dict) else detail
            except (ValueError, AttributeError):
                detail = body
            raise ServerError(f"{self.url}{path} answered HTTP {exc.code}: {str(detail)[:500]}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach the server at {self.url} ({reason}); is `mono serve` running?") from None

    # ------------------------------------------------------------------------------------------ API
    def models(self) -> list[str]:
        with self._request("/v1/models") as resp:
            body = json.load(resp)
        return [m["id"] for m in body.get("data", [])]

    @property
    def model(self) -> str:
        """The first model the server lists (LMDeploy serves one)."""
        if self._model is None:
            names = self.models()
            if not names:
                raise ServerError(f"{self.url}/v1/models lists no model")
            self._model = names[0]
        return self._model

    def _payload(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float, stream: bool,
                 extra: Optional[dict[str, Any]]) -> dict[str, Any]:
        payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                   "temperature": temperature, "stream": stream}
        if temperature == 0:
            payload["top_k"] = 1  # LMDeploy reads top_k; greedy either way
        payload.update(extra or {})
        return payload

    def chat(self, messages: list[dict[str, Any]], max_tokens: int = 256, temperature: float = 0.0,
             extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The full (non-streamed) response object."""
        with self._request("/v1/chat/completions", self._payload(messages, max_tokens, temperature, False, extra)) as r:
            body = json.load(r)
        if not body.get("choices"):
            raise ServerError(f"{self.url}/v1/chat/completions returned no choices: {str(body)[:300]}")
        return body

    def stream(self, messages: list[dict[str, Any]], max_tokens: int = 256, temperature: float = 0.0,
               extra: Optional[dict[str, Any]] = None) -> Iterator[StreamEvent]:
        """Server-sent chunks as they arrive (``stream: true``)."""
        payload = self._payload(messages, max_tokens, temperature, True, extra)
        payload.setdefault("stream_options", {"include_usage": True})
        with self._request("/v1/chat/completions", payload) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServerError(f"{self.url} stream error: {chunk['error']}")
                if chunk.get("usage"):
                    yield StreamEvent("", time.perf_counter(), None, chunk["usage"].get("completion_tokens"))
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta", {}).get("content") or ""
                    yield StreamEvent(delta, time.perf_counter(), choice.get("finish_reason"))
