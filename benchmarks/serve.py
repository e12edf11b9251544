"""Serving latency and throughput: time to first token (TTFT) and output tokens/s on a fixed set of image+text
requests, for LMDeploy's PyTorch engine and for this project's own ``generate`` (``mono bench-serve``).

    mono bench-serve MODEL_DIR                               # engines: own, and lmdeploy when CUDA is here
    mono bench-serve MODEL_DIR --engines own --requests 4 --max-new-tokens 16
    mono bench-serve --url http://127.0.0.1:23333            # a running server (mono serve / lmdeploy), over HTTP

Requests are sent one at a time (batch 1: latency, not peak throughput), after ``--warmup`` untimed ones. Each
request asks a fixed question about one of ``skimage.data``'s bundled images (several sizes and aspect ratios,
so the tile counts differ) and decodes exactly ``--max-new-tokens`` tokens greedily (end-of-sequence ignored),
so every engine does the same work. Per request: TTFT (submit to first generated token), decode tokens/s
(tokens after the first / time after the first), end-to-end output tokens/s. Written as JSON under
``benchmarks/results/serve/`` with git sha, device and versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, choice_list, device_tag, environment, git_state

ENGINES = ("own", "lmdeploy")
# (skimage.data name, question): RGB and grey, square and wide, small and large.
REQUESTS = (
    ("astronaut", "Describe the image."),
    ("coffee", "What is on the table?"),
    ("rocket", "What is happening in this picture?"),
    ("chelsea", "What animal is this?"),
    ("text", "Read the text in the image."),
    ("coins", "How many coins are there?"),
    ("hubble_deep_field", "What does this image show?"),
    ("page", "What kind of document is this?"),
)


@dataclass
class Request:
    name: str
    question: str
    png: bytes
    width: int
    height: int


@dataclass
class Sample:
    """One timed request. Times are seconds from submission."""

    name: str
    ttft_s: float
    output_tokens: int
    total_s: float
    decode_tok_s: Optional[float]
    e2e_tok_s: float


def fixed_requests(n: int) -> list[Request]:
    """The first ``n`` requests of :data:`REQUESTS` (cycled), images encoded as PNG."""
    import skimage.data
    from PIL import Image

    out = []
    for i in range(n):
        name, question = REQUESTS[i % len(REQUESTS)]
        array = getattr(skimage.data, name)()
        image = Image.fromarray(array).convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(Request(name, question, buf.getvalue(), image.width, image.height))
    return out


def _sample(name: str, start: float, times: list[float], tokens: int) -> Sample:
    if not times or tokens < 1:
        raise RuntimeError(f"request {name!r} produced no token")
    end = times[-1]
    decode = (tokens - 1) / (end - times[0]) if tokens > 1 and end > times[0] else None
    return Sample(name, times[0] - start, tokens, end - start, decode, tokens / (end - start))


# ================================================================================================ engines
def run_own(model_dir: str, requests: list[Request], max_new_tokens: int, dtype: str, log) -> Iterator[Sample]:
    from mono.deploy.openai_api import ChatRequest
    from mono.deploy.own_server import OwnEngine

    engine = OwnEngine(model_dir, dtype=dtype)
    for req in requests:
        start = time.perf_counter()
        times, tokens = [], 0
        for event in engine.generate(ChatRequest(req.question, images=[req.png]), max_new_tokens=max_new_tokens,
                                     ignore_eos=True):
            if event.tokens > tokens:
                times.append(event.time)
                tokens = event.tokens
        yield _sample(req.name, start, times, tokens)


def run_lmdeploy(model_dir: str, requests: list[Request], max_new_tokens: int, dtype: str, log) -> Iterator[Sample]:
    from lmdeploy import GenerationConfig
    from PIL import Image

    from mono.deploy import lmdeploy as mld

    pipe = mld.pipeline(model_dir)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, ignore_eos=True, top_k=1)
    try:
        for req in requests:
            image = Image.open(io.BytesIO(req.png)).convert("RGB")
            start = time.perf_counter()
            times, tokens = [], 0
            for resp in pipe.stream_infer([(req.question, image)], gen_config=gen):
                if resp.generate_token_len > tokens:
                    times.append(time.perf_counter())
                    tokens = resp.generate_token_len
            yield _sample(req.name, start, times, tokens)
    finally:
        pipe.close()


def run_url(url: str, requests: list[Request], max_new_tokens: int, log) -> Iterator[Sample]:
    from mono.deploy.client import ServerClient
    from mono.deploy.openai_api import user_message

    client = ServerClient(url)
    for req in requests:
        messages = [user_message(req.question, [req.png])]
        start = time.perf_counter()
        times, tokens = [], None
        for event in client.stream(messages, max_tokens=max_new_tokens, extra={"ignore_eos": True}):
            if event.text:
                times.append(event.time)
            if event.completion_tokens is not None:
                tokens = event.completion_tokens
        # A chunk may carry several tokens: the count is the server's usage figure, else what was asked for
        # (ignore_eos makes the server decode exactly max_new_tokens).
        yield _sample(req.name, start, times, tokens if tokens is not None else max_new_tokens)


# ================================================================================================ report
def summarize(samples: list[Sample]) -> dict:
    ttft = np.array([s.ttft_s for s in samples]) * 1e3
    decode = [s.decode_tok_s for s in samples if s.decode_tok_s is not None]
    total_tokens = sum(s.output_tokens for s in samples)
    return {
        "requests": len(samples),
        "ttft_ms_mean": float(ttft.mean()), "ttft_ms_p50": float(np.percentile(ttft, 50)),
        "ttft_ms_p90": float(np.percentile(ttft, 90)),
        "decode_tok_s_mean": float(np.mean(decode)) if decode else None,
        "output_tok_s": total_tokens / sum(s.total_s for s in samples),
        "output_tokens": total_tokens,
    }


def _table(results: dict) -> str:
    head = f"{'engine':<10} {'status':<8} {'TTFT mean ms':>12} {'TTFT p90 ms':>11} {'decode tok/s':>12} {'output tok/s':>12}"
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        s = res.get("summary")
        if s is None:
            lines.append(f"{name:<10} {res['status']:<8} {res.get('reason', '')}")
            continue
        dec = f"{s['decode_tok_s_mean']:.1f}" if s["decode_tok_s_mean"] is not None else "-"
        lines.append(f"{name:<10} {res['status']:<8} {s['ttft_ms_mean']:>12.1f} {s['ttft_ms_p90']:>11.1f} {dec:>12} "
                     f"{s['output_tok_s']:>12.1f}")
    return "\n".join(lines)


# ================================================================================================ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", help="exported checkpoint folder (not with --url)")
    p.add_argument("--engines", type=choice_list(ENGINES), default=None,
                   help="comma list of own,lmdeploy (default: own, plus lmdeploy when CUDA is available)")
    p.add_argument("--url", default=None, help="measure a running OpenAI-compatible server instead (over HTTP)")
    p.add_argument("--requests", type=int, default=8, help=f"timed requests (default 8; cycles {len(REQUESTS)} images)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens decoded per request (default 64)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="own engine dtype (default: bfloat16 on CUDA, float32 on CPU); LMDeploy runs bfloat16")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "serve", help="output folder")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, log: Callable[[str], None] = print) -> int:
    if (args.model is None) == (args.url is None):
        parser.error("give either MODEL_DIR (in-process engines) or --url URL (a running server)")
    if args.requests < 1 or args.warmup < 0 or args.max_new_tokens < 2:
        parser.error("--requests must be >= 1, --warmup >= 0 and --max-new-tokens >= 2")
    cuda = torch.cuda.is_available()
    requests = fixed_requests(args.requests + args.warmup)
    warm, timed = requests[:args.warmup], requests[args.warmup:]
    results: dict[str, dict] = {}
    if args.url is not None:
        runners = {"server": lambda reqs: run_url(args.url, reqs, args.max_new_tokens, log)}
    else:
        from mono.deploy.serve import check_mono_folder

        check_mono_folder(parser, args.model)
        engines = args.engines or (["own", "lmdeploy"] if cuda else ["own"])
        dtype = args.dtype or ("bfloat16" if cuda else "float32")
        runners = {}
        for name in engines:
            if name == "lmdeploy" and not cuda:
                results[name] = {"status": "skipped", "reason": "LMDeploy's PyTorch engine needs a CUDA GPU"}
            elif name == "lmdeploy":
                runners[name] = lambda reqs: run_lmdeploy(args.model, reqs, args.max_new_tokens, "bfloat16", log)
            else:
                runners[name] = lambda reqs, d=dtype: run_own(args.model, reqs, args.max_new_tokens, d, log)
    for name, runner in runners.items():
        log(f"{name}: {len(warm)} warm-up + {len(timed)} timed requests, {args.max_new_tokens} new tokens each")
        try:
            stream = runner(warm + timed)
            for _ in warm:
                next(stream)
            samples = []
            for sample in stream:
                samples.append(sample)
                log(f"  {sample.name:<18} TTFT {sample.ttft_s * 1e3:8.1f} ms  {sample.output_tokens} tokens  "
                    f"{sample.e2e_tok_s:7.1f} tok/s")
            results[name] = {"status": "ok", "summary": summarize(samples), "samples": [asdict(s) for s in samples]}
        except Exception as exc:  # recorded: one engine failing does not hide the others' numbers
            results[name] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            log(f"  ERROR {name}: {results[name]['reason']}")
    device = torch.device("cuda" if cuda else "cpu")
    env = environment(device)
    try:  # the version only: importing lmdeploy changes PIL settings process-wide
        env["lmdeploy"] = importlib.metadata.version("lmdeploy")
    except importlib.metadata.PackageNotFoundError:
        env["lmdeploy"] = None
    import transformers

    env["transformers"] = transformers.__version__
    record = {
        "benchmark": "serve", "git": git_state(), "environment": env,
        "model": args.url if args.url else str(Path(args.model).resolve().name),
        "settings": {"requests": args.requests, "warmup": args.warmup, "max_new_tokens": args.max_new_tokens,
                     "batch": 1, "images": [(r.name, r.width, r.height) for r in timed]},
        "results": results,
    }
    log(_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "server" if args.url else Path(args.model).resolve().name
    path = args.out / f"serve_{stem}_{device_tag(env, device)}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {path}")
    return 0 if all(r["status"] != "error" for r in results.values()) else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mono bench-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
