"""``mono-chat``: chat with a Mono-InternVL checkpoint folder from the command line.

    mono-chat path/to/model --image cat.jpg --question "Describe the image."
    mono-chat path/to/model                      # interactive: one question per line, history kept

The folder must hold the release layout (config.json + safetensors) and a tokenizer. ``--image`` may be given
several times; each image gets its share of ``--max-tiles``.
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mono-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder (release layout, with tokenizer files)")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--question", help="ask one question and exit (default: interactive)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-tiles", type=int, default=None, help="tile budget (default: config max_dynamic_patch)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .modeling import MonoInternVL
    from .processing import load_images
    from .tokenization import load_tokenizer

    model = MonoInternVL.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
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
    questions = [args.question] if args.question is not None else _interactive()
    for question in questions:
        answer, history = model.chat(
            tokenizer, pixel_values, question, gen, history=history, return_history=True, num_patches_list=num_patches
        )
        print(answer, flush=True)
    return 0


def _interactive():
    print("mono-chat: one question per line; an empty line or Ctrl-D ends.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            return
        yield line.rstrip("\n")


if __name__ == "__main__":
    sys.exit(main())
