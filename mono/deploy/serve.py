"""``mono serve``: an OpenAI-compatible server for an exported checkpoint folder.

    mono serve out_dir                       # LMDeploy's PyTorch engine (CUDA), Mono registration applied
    mono serve out_dir --engine own          # this project's own generate (CPU or GPU), same API
    mono serve out_dir --dry-run             # print what would be started and exit

The LMDeploy engine runs in bfloat16 (fp16 is refused: Mono-InternVL overflows in it), with the folder's chat template
(``internlm2-chat``, LMDeploy's ``internvl2-internlm2``). From LMDeploy 0.12.2 on (its own Mono-InternVL breaks there
and was removed in 0.15) :mod:`mono.deploy.lmdeploy` registers this project's implementation first; 0.6.3-0.12.1
load the folder natively.
Query it with ``mono chat http://HOST:PORT --image F "question"`` or any OpenAI client.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_serve_arguments", "check_mono_folder", "run_serve", "serve_plan"]

MONO_LLM_ARCHITECTURE = "InternLM2VEForCausalLM"
ENGINES = ("lmdeploy", "own")


def check_mono_folder(parser: argparse.ArgumentParser, path: str) -> Path:
    """``path`` as an exported Mono-InternVL folder (weights, tokenizer, Mono config), or a usage error."""
    from ..cli import check_model_dir

    folder = check_model_dir(parser, path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"{folder / 'config.json'} cannot be read as JSON: {exc}")
    archs = (config.get("llm_config") or {}).get("architectures") or []
    if MONO_LLM_ARCHITECTURE not in archs:
        parser.error(
            f"{folder / 'config.json'}: llm_config.architectures is {archs}, not [{MONO_LLM_ARCHITECTURE!r}]; this is "
            "not a Mono-InternVL folder in the release layout (write one with `mono export CHECKPOINT OUT_DIR`)"
        )
    return folder


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="exported checkpoint folder (see `mono export`)")
    p.add_argument("--engine", choices=ENGINES, default="lmdeploy",
                   help="lmdeploy: LMDeploy's PyTorch engine (CUDA); own: this project's generate (default: lmdeploy)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=23333, help="port (default: 23333, LMDeploy's)")
    p.add_argument("--model-name", default=None, help="name in /v1/models (default: the folder name)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="lmdeploy: bfloat16 only (the default); own: default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--session-len", type=int, default=None, help="lmdeploy: max tokens per session")
    p.add_argument("--max-batch-size", type=int, default=None, help="lmdeploy: max concurrent sequences")
    p.add_argument("--cache-max-entry-count", type=float, default=None,
                   help="lmdeploy: share of free GPU memory for the KV cache")
    p.add_argument("--tp", type=int, default=1, help="lmdeploy: tensor-parallel GPUs (default: 1)")
    p.add_argument("--max-tiles", type=int, default=None, help="own: tile budget per request (default: config)")
    p.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--api-keys", nargs="*", default=None, help="lmdeploy: accepted API keys (default: none needed)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan as JSON and exit")


def serve_plan(args: argparse.Namespace) -> dict[str, Any]:
    """What ``mono serve`` starts, as JSON-able data (``--dry-run`` prints it)."""
    folder = Path(args.model)
    plan: dict[str, Any] = {"engine": args.engine, "model": str(folder.resolve()), "host": args.host,
                            "port": args.port, "model_name": args.model_name or folder.resolve().name}
    if args.engine == "own":
        import torch

        plan["dtype"] = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
        plan["max_tiles"] = args.max_tiles
        return plan
    from . import lmdeploy as mld

    dtype = args.dtype or "bfloat16"
    mld.check_dtype(dtype)
    overrides = {k: v for k, v in (("session_len", args.session_len), ("max_batch_size", args.max_batch_size),
                                   ("cache_max_entry_count", args.cache_max_entry_count), ("tp", args.tp))
                 if v is not None}
    config = mld.engine_config(dtype=dtype, **overrides)
    plan.update(
        lmdeploy_version=mld.lmdeploy_version(),
        registration=mld.needs_registration(),
        backend="pytorch",
        backend_config={k: v for k, v in vars(config).items() if not k.startswith("_")},
        chat_template=mld.chat_template_config(str(folder)).model_name,
    )
    return plan


def _serve_lmdeploy(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    from . import lmdeploy as mld

    mld.register()
    from lmdeploy.serve.openai.api_server import serve

    overrides = {k: v for k, v in plan["backend_config"].items() if k != "dtype"}
    print(f"mono serve: LMDeploy {plan['lmdeploy_version']} PyTorch engine on http://{args.host}:{args.port} "
          f"(model {plan['model_name']!r}, bfloat16, template {plan['chat_template']})", file=sys.stderr, flush=True)
    serve(plan["model"], model_name=plan["model_name"], backend="pytorch",
          backend_config=mld.engine_config(dtype=plan["backend_config"]["dtype"], **overrides),
          chat_template_config=mld.chat_template_config(plan["model"]), server_name=args.host, server_port=args.port,
          log_level=args.log_level, api_keys=args.api_keys, trust_remote_code=True)
    return 0


def _serve_own(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    from .own_server import OwnEngine, make_server

    engine = OwnEngine(plan["model"], dtype=plan["dtype"], max_tiles=args.max_tiles)
    engine.name = plan["model_name"]
    server = make_server(engine, args.host, args.port)
    print(f"mono serve: own engine ({plan['dtype']}) on http://{args.host}:{server.server_address[1]} "
          f"(model {engine.name!r}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    check_mono_folder(parser, args.model)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number")
    if args.max_tiles is not None and args.max_tiles < 1:
        parser.error("--max-tiles must be >= 1")
    try:
        plan = serve_plan(args)
    except (ImportError, ValueError) as exc:
        parser.error(str(exc))
    if args.dry_run:
        print(json.dumps(plan, indent=2, default=str))
        return 0
    return _serve_own(args, plan) if args.engine == "own" else _serve_lmdeploy(args, plan)
