"""The ``mono`` command: one subcommand per task on a Mono-InternVL checkpoint folder.

    mono chat path/to/model --image cat.jpg "Describe the image."
    mono chat --model path/to/model --image cat.jpg --question "Describe the image."
    mono chat path/to/model                      # interactive: one question per line, history kept
    mono chat http://127.0.0.1:23333 --image cat.jpg "Describe the image."   # a running `mono serve` / LMDeploy
    mono export RUN_OR_CHECKPOINT OUT_DIR        # release layout + HF remote code (see mono/deploy/export.py)
    mono serve OUT_DIR [--engine lmdeploy|own]   # OpenAI-compatible server
    mono bench-serve OUT_DIR                     # TTFT and tokens/s: LMDeploy vs this project's generate
    mono-chat path/to/model --image cat.jpg --question "..."      # the older command, same options as `mono chat`

The folder must hold the release layout (config.json + safetensors) and a tokenizer. ``--image`` may be given
several times; each image gets its share of ``--max-tiles``.

A subcommand is a :class:`Command` in :data:`COMMANDS`: a function that adds its arguments to its parser and a
function that runs it. Each subcommand's arguments are parsed "intermixed", so positionals may follow options
(``mono chat DIR --image F "question"``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

DTYPES = ("bfloat16", "float16", "float32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class Command:
    """One ``mono`` subcommand."""

    name: str
    help: str
    """One line for ``mono --help``."""
    configure: Callable[[argparse.ArgumentParser], None]
    """Adds the subcommand's arguments to its parser."""
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]
    """Runs it; reports usage errors with ``parser.error`` (exit status 2)."""


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add ``command`` to :data:`COMMANDS` (``mono <name>``)."""
    if command.name in COMMANDS:
        raise ValueError(f"mono: subcommand {command.name!r} is registered twice")
    COMMANDS[command.name] = command
    return command


def check_model_dir(parser: argparse.ArgumentParser, path: str, *, tokenizer: bool = True) -> Path:
    """``path`` as a checkpoint folder (config.json, weights and, with ``tokenizer``, tokenizer files), or a
    usage error naming what is missing."""
    folder = Path(path)
    if not folder.exists():
        parser.error(f"model folder '{folder}' does not exist")
    if not folder.is_dir():
        parser.error(f"model '{folder}' is a file; pass the checkpoint folder (config.json, *.safetensors, tokenizer)")
    if not (folder / "config.json").is_file():
        parser.error(f"model folder '{folder}' holds no config.json; pass a checkpoint folder in the release layout")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        parser.error(f"model folder '{folder}' holds no weights ({' or '.join(WEIGHT_FILES)})")
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        parser.error(f"model folder '{folder}' holds no tokenizer ({', '.join(TOKENIZER_FILES)}); save the "
                     "tokenizer beside the model (tokenizer.save_pretrained(folder))")
    return folder


# ============================================================================================== mono chat
def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="checkpoint folder (release layout, with tokenizer files), or the http:// URL of a server")
    p.add_argument("question", nargs="?", metavar="QUESTION", help="ask one question and exit (default: interactive)")
    p.add_argument("--model", dest="model_option", metavar="DIR", help="checkpoint folder (instead of MODEL)")
    p.add_argument("--question", dest="question_option", metavar="Q", help="the question (instead of QUESTION)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="image file (repeat for several images)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="answer length cap (default: 256)")
    p.add_argument("--max-tiles", type=int, default=None, metavar="N",
                   help="tile budget (default: config max_dynamic_patch)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute dtype (default: float32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--api-key", default=None, help="server only: bearer token, if the server wants one")


def _resolve_chat_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fold ``--model`` / ``--question`` and the positionals into ``args.model`` and ``args.question``."""
    positionals = [v for v in (args.model, args.question) if v is not None]
    if args.model_option is not None:
        # With --model, the only positional left is the question (argparse filled MODEL first).
        if len(positionals) > 1:
            parser.error(f"--model {args.model_option} is given, so only one positional (the question) is allowed; "
                         f"got {positionals}")
        model, question = args.model_option, (positionals[0] if positionals else None)
    elif positionals:
        model, question = positionals[0], (positionals[1] if len(positionals) > 1 else None)
    else:
        parser.error("give the checkpoint folder: MODEL (first positional) or --model DIR")
    if args.question_option is not None:
        if question is not None:
            parser.error(f"the question is given twice: {question!r} and --question {args.question_option!r}")
        question = args.question_option
    if question is not None and not question.strip():
        parser.error("the question is empty")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.max_tiles is not None and args.max_tiles < 1:
        parser.error("--max-tiles must be >= 1")
    missing = [f for f in args.image if not Path(f).is_file()]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")
    from .deploy.client import is_url

    args.model = model if is_url(model) else str(check_model_dir(parser, model))
    args.question = question
    return args


def run_chat(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Answer ``args.question`` (or each line of stdin) about ``args.image`` with the model in ``args.model``."""
    args = _resolve_chat_args(args, parser)
    from .deploy.client import is_url

    if is_url(args.model):
        return _chat_server(args, parser)
    import torch

    from .modeling import MonoInternVL
    from .processing import load_images
    from .tokenization import load_tokenizer

    model = MonoInternVL.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    tokenizer = load_tokenizer(args.model)
    pixel_values, num_patches = None, None
    if args.image:
        cfg = model.config
        pixel_values, num_patches = load_images(
            args.image,
            image_size=cfg.image_size,
            min_num=cfg.min_dynamic_patch,
            max_num=args.max_tiles or cfg.max_dynamic_patch,
            use_thumbnail=cfg.use_thumbnail,
        )
        pixel_values = pixel_values.to(model.dtype)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    history = None
    questions = [args.question] if args.question is not None else _interactive(parser.prog)
    for question in questions:
        answer, history = model.chat(
            tokenizer, pixel_values, question, gen, history=history, return_history=True, num_patches_list=num_patches
        )
        print(answer, flush=True)
    return 0


def _chat_server(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``mono chat URL``: the same conversation through a running OpenAI-compatible server."""
    from .deploy.client import ServerClient, ServerError
    from .deploy.openai_api import user_message

    if args.max_tiles is not None:
        parser.error("--max-tiles applies to a local folder; the server's own setting decides its tile budget")
    client = ServerClient(args.model, api_key=args.api_key)
    messages: list[dict] = []
    questions = [args.question] if args.question is not None else _interactive(parser.prog)
    for question in questions:
        messages.append(user_message(question, args.image if not messages else []))
        try:
            body = client.chat(messages, max_tokens=args.max_new_tokens, temperature=1.0 if args.sample else 0.0)
        except ServerError as exc:
            print(f"{parser.prog}: {exc}", file=sys.stderr)
            return 1
        answer = body["choices"][0]["message"]["content"] or ""
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
    return 0


def _interactive(prog: str):
    print(f"{prog}: one question per line; an empty line or Ctrl-D ends.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            return
        yield line.rstrip("\n")


register(Command("chat", "chat with a checkpoint or a server about images (one question, or interactive)",
                 _chat_arguments, run_chat))


# ============================================================================================== deployment
# Each command imports its module only when it runs, so `mono --help` and `mono chat` stay light.
def _lazy(module: str, configure: str, run: str) -> tuple[Callable, Callable]:
    import importlib

    return (lambda p: getattr(importlib.import_module(module), configure)(p),
            lambda a, p: getattr(importlib.import_module(module), run)(a, p))


register(Command("export", "write a deployable release-layout folder (bf16 shards, HF remote code, tokenizer)",
                 *_lazy("mono.deploy.export", "add_export_arguments", "run_export")))
register(Command("serve", "serve an exported folder over the OpenAI API (LMDeploy, or this project's engine)",
                 *_lazy("mono.deploy.serve", "add_serve_arguments", "run_serve")))
register(Command("bench-serve", "time to first token and tokens/s: LMDeploy vs this project's generate",
                 *_lazy("benchmarks.serve", "add_arguments", "run")))


# ============================================================================================== entry points
def build_parser(only: Optional[Sequence[str]] = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``mono`` parser and its subparsers (name -> parser), one per registered :class:`Command`; with ``only``,
    just those subcommands get their arguments (the others are listed by name: their modules are not imported)."""
    parser = argparse.ArgumentParser(
        prog="mono", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    subparsers = {}
    for cmd in COMMANDS.values():
        subparsers[cmd.name] = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if only is None or cmd.name in only:
            cmd.configure(subparsers[cmd.name])
    return parser, subparsers


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``mono COMMAND ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser(only=argv[:1])
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # help, or a usage error listing the commands
        return 2
    # The subparser parses the rest on its own, intermixed: argparse's subparser action cannot.
    sub = subparsers[argv[0]]
    return COMMANDS[argv[0]].run(sub.parse_intermixed_args(argv[1:]), sub)


def chat_main(argv: Optional[Sequence[str]] = None) -> int:
    """``mono-chat ...``: the older name of ``mono chat`` (same arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS["chat"]
    parser = argparse.ArgumentParser(prog="mono-chat", description=command.help)
    command.configure(parser)
    return command.run(parser.parse_intermixed_args(argv), parser)


def _module_main(argv: Sequence[str]) -> int:
    # `python -m mono.cli COMMAND ...` is `mono`; `python -m mono.cli MODEL ...` (no command) is the older
    # `mono-chat` form, which scripts (evip.demo) still call.
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help"):
        return main(argv)
    return chat_main(argv)


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
