"""This project's own inference engine behind an OpenAI-compatible HTTP server (``mono serve --engine own``).

It runs :meth:`mono.MonoInternVL.chat` (the reference numerics, CPU or GPU), one request at a time. Use it where
LMDeploy cannot run (a CPU machine), to check a deployment against the reference, and as the baseline of
``mono bench-serve``. Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (plain or ``stream: true``;
``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``ignore_eos``), ``GET /health``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..templates import IMAGE_PLACEHOLDER
from .openai_api import ChatRequest, ProtocolError, parse_messages, sse

__all__ = ["OwnEngine", "TokenEvent", "make_server"]


@dataclass
class TokenEvent:
    """New answer text after one generated token, with the token count so far and the time it was produced."""

    text: str
    tokens: int
    time: float
    prompt_tokens: int = 0


class _QueueStreamer(BaseStreamer):
    """Receives generate()'s tokens: the first ``put`` is the prompt, every later one a new token."""

    def __init__(self) -> None:
        self.queue: "queue.Queue[Optional[list[int]]]" = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _Cancelled(StoppingCriteria):
    """Stops generation once ``event`` is set (the consumer went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _with_placeholders(request: ChatRequest) -> ChatRequest:
    """``request`` with one ``<image>\\n`` per image before the first user turn when it holds no placeholder (what
    :meth:`MonoInternVL.chat` does), so the prompt can be rendered and counted before generation."""
    texts = [q for q, _ in request.history] + [request.question]
    if not request.images or any(IMAGE_PLACEHOLDER in t for t in texts):
        return request
    prefix = (IMAGE_PLACEHOLDER + "\n") * len(request.images)
    if request.history:
        history = [(prefix + request.history[0][0], request.history[0][1]), *request.history[1:]]
        return dataclasses.replace(request, history=history)
    return dataclasses.replace(request, question=prefix + request.question)


class OwnEngine:
    """A checkpoint folder loaded for chat: ``generate(request, ...)`` yields :class:`TokenEvent` s."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: Optional[str] = None,
                 max_tiles: Optional[int] = None) -> None:
        from ..modeling import MonoInternVL
        from ..tokenization import load_tokenizer

        self.model_dir = Path(model_dir)
        self.name = self.model_dir.resolve().name
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = MonoInternVL.from_pretrained(self.model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.max_tiles = max_tiles or self.model.config.max_dynamic_patch
        self._lock = threading.Lock()

    def _pixels(self, images: list[bytes]) -> tuple[Optional[torch.Tensor], Optional[list[int]]]:
        if not images:
            return None, None
        from ..processing import load_images

        cfg = self.model.config
        try:
            pixel_values, num_patches = load_images(images, image_size=cfg.image_size, min_num=cfg.min_dynamic_patch,
                                                    max_num=self.max_tiles, use_thumbnail=cfg.use_thumbnail)
        except (ValueError, OSError) as exc:
            raise ProtocolError(f"an image could not be decoded: {exc}") from None
        return pixel_values.to(self.model.dtype), num_patches

    def prompt_tokens(self, request: ChatRequest, num_patches: Optional[list[int]]) -> int:
        prompt = self.model._render(request.history, request.question, num_patches or [],
                                    ("<img>", "</img>", "<IMG_CONTEXT>"))
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def generate(self, request: ChatRequest, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, ignore_eos: bool = False) -> Iterator[TokenEvent]:
        """Answer ``request``; events arrive as tokens are generated. The last event's text completes the answer."""
        if max_new_tokens < 1:
            raise ProtocolError(f"max_tokens must be >= 1, got {max_new_tokens}")
        pixel_values, num_patches = self._pixels(request.images)
        request = _with_placeholders(request)
        gen: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            gen.update(temperature=temperature, top_p=top_p)
        if ignore_eos:
            gen["min_new_tokens"] = max_new_tokens
        prompt_tokens = self.prompt_tokens(request, num_patches)
        streamer, cancel = _QueueStreamer(), threading.Event()
        gen["streamer"] = streamer
        gen["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        result: dict[str, Any] = {}

        def work() -> None:
            saved = self.model.system_message
            try:
                if request.system is not None:
                    self.model.system_message = request.system
                with torch.inference_mode():
                    result["answer"] = self.model.chat(self.tokenizer, pixel_values, request.question, gen,
                                                       history=request.history, num_patches_list=num_patches)
            except BaseException as exc:  # handed to the consumer below
                result["error"] = exc
                streamer.end()
            finally:
                self.model.system_message = saved

        with self._lock:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            ids: list[int] = []
            shown = ""
            turn_end = self.model._template().turn_end
            try:
                while (item := streamer.queue.get()) is not None:
                    ids += item
                    text = self.tokenizer.decode(ids, skip_special_tokens=True).split(turn_end)[0]
                    # Hold back an incomplete multi-byte character; emit only what extends what was shown.
                    delta = text[len(shown):] if text.startswith(shown) and not text.endswith("\ufffd") else ""
                    shown += delta
                    yield TokenEvent(delta, len(ids), time.perf_counter(), prompt_tokens)
            finally:  # also when the consumer stops early: end generation before the next request may start
                cancel.set()
                thread.join()
            if "error" in result:
                raise result["error"]
            answer = result["answer"]
            if answer != shown and answer.startswith(shown):
                yield TokenEvent(answer[len(shown):], len(ids), time.perf_counter(), prompt_tokens)


# ================================================================================================ HTTP
def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def make_server(engine: OwnEngine, host: str = "127.0.0.1", port: int = 23333) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call ``serve_forever``) answering OpenAI chat requests with ``engine``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mono-own"

        def log_message(self, fmt: str, *args: Any) -> None:  # one line per request on stderr, like uvicorn
            super().log_message(fmt, *args)

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": status}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": engine.name, "object": "model",
                                                             "owned_by": "mono-internvl"}]})
            elif self.path.rstrip("/") == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}; use /v1/models or /v1/chat/completions")

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}; use /v1/chat/completions")
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ProtocolError("the request body must be a JSON object")
                request = parse_messages(body.get("messages"))
                max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
                temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
                if body.get("top_k") == 1:
                    temperature = 0.0
                args = dict(max_new_tokens=max_tokens, temperature=temperature,
                            top_p=float(body.get("top_p") or 1.0), ignore_eos=bool(body.get("ignore_eos", False)))
                stream = bool(body.get("stream", False))
                events = engine.generate(request, **args)
                first = next(events, None)  # surfaces request errors before any header is sent
            except json.JSONDecodeError as exc:
                self._error(400, f"the request body is not JSON: {exc}")
                return
            except (ProtocolError, TypeError, ValueError) as exc:
                self._error(getattr(exc, "status", 400), str(exc))
                return
            created, cid = int(time.time()), _completion_id()
            pending = [first] if first is not None else []
            if not stream:
                try:
                    done = [*pending, *events]
                except Exception as exc:
                    self._error(500, f"generation failed: {exc}")
                    return
                count = done[-1].tokens if done else 0
                reason = "length" if count >= args["max_new_tokens"] else "stop"
                self._json(200, {
                    "id": cid, "object": "chat.completion", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "finish_reason": reason,
                                 "message": {"role": "assistant", "content": "".join(e.text for e in done)}}],
                    "usage": _usage(done[-1].prompt_tokens if done else 0, count),
                })
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            count, prompt = 0, first.prompt_tokens if first is not None else 0
            try:
                for event in itertools.chain(pending, events):
                    count = event.tokens
                    self.wfile.write(sse(self._chunk(cid, created, {"content": event.text}, None)))
                    self.wfile.flush()
                reason = "length" if count >= args["max_new_tokens"] else "stop"
                self.wfile.write(sse(self._chunk(cid, created, {}, reason)))
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = _usage(prompt, count)
                    self.wfile.write(sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": engine.name, "choices": [], "usage": usage}))
                self.wfile.write(sse("[DONE]"))
                self.wfile.flush()
            except Exception as exc:  # the client went away, or generation failed mid-stream
                try:
                    self.wfile.write(sse({"error": {"message": str(exc)}}))
                except OSError:
                    pass
            finally:
                events.close()  # stops generation if the client went away; frees the engine

        def _chunk(self, cid: str, created: int, delta: dict[str, Any], reason: Optional[str]) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    return ThreadingHTTPServer((host, port), Handler)
