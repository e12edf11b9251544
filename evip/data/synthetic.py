"""Random datasets in the formats users bring (random pixels and words) and a random plain LLM, for throughput
benchmarks, smoke runs and tests.

Nothing here can be learned (the captions do not describe the pixels); the point is realistic shapes: images of
several aspect ratios (so dynamic tiling varies), captions and answers of realistic lengths, text-only samples
among the conversations, written as a webdataset shard or as an InternVL meta JSON + LLaVA JSONL.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["WORDS", "write_random_dataset", "write_random_llm"]

WORDS = ("red green blue yellow black white circle square triangle shape image picture left right top bottom "
         "small large one two three the a of on in with and is there what colour how many").split()


def _image(rng: random.Random, size: int) -> Image.Image:
    """A random image of a random aspect ratio around ``size`` px (so dynamic tiling varies)."""
    w, h = rng.choice(((1, 1), (2, 1), (1, 2), (3, 2), (4, 3), (2, 3)))
    arr = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size * h, size * w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_random_dataset(folder: Path, kind: str, num: int, size: int, seed: int = 0) -> dict:
    """``pairs``: one webdataset shard; ``conversations``: meta JSON + JSONL (image and text-only samples)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "pairs":
        with tarfile.open(folder / "shard-000000.tar", "w") as tf:
            for i in range(num):
                buf = io.BytesIO()
                _image(rng, size).save(buf, format="JPEG", quality=90)
                for name, payload in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", _text(rng, 40).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        return {"path": str(folder), "format": "webdataset"}
    (folder / "images").mkdir(exist_ok=True)
    lines = []
    for i in range(num):
        record = {"id": i, "conversations": [
            {"from": "human", "value": ("<image>\n" if i % 5 else "") + _text(rng, 12) + "?"},
            {"from": "gpt", "value": _text(rng, 60)},
        ]}
        if i % 5:  # every fifth sample is text-only
            _image(rng, size).save(folder / "images" / f"{i}.jpg", quality=90)
            record["image"] = f"{i}.jpg"
        lines.append(json.dumps(record))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"synthetic": {"root": "images", "annotation": "train.jsonl", "repeat_time": 1, "length": num}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return {"path": str(folder / "meta.json"), "format": "meta"}


def write_random_llm(folder: Path, tokenizer, seed: int = 0, **sizes) -> Path:
    """A random plain InternLM2 (default D 64, F 96, 2 layers, GQA 4/2) sized for ``tokenizer``, saved with it as an
    HF folder: the starting point of S1.1 in smoke runs and tests. ``sizes`` override the config fields."""
    import torch

    from mono.configuration import PLAIN_LLM_ARCHITECTURE, InternLM2Config
    from mono.internlm2 import InternLM2ForCausalLM

    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)
    fields.update(sizes)
    config = InternLM2Config(
        architectures=[PLAIN_LLM_ARCHITECTURE], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields,
    )
    torch.manual_seed(seed)
    folder = Path(folder)
    InternLM2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
