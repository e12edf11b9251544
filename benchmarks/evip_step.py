"""Training throughput of the EViP engine: tokens/s, MFU, step time and memory of real training steps.

    python -m benchmarks.evip_step                              # CPU: the small model, S1.1 and S2
    python -m benchmarks.evip_step --size 2b --steps 30         # GPU: Mono-InternVL-2B sizes, bf16, FSDP2

Each run is the real trainer (:class:`evip.train.Trainer`) on random weights built from a config of the chosen
size, reading a synthetic dataset written in the formats users bring (webdataset image-caption shards for S1.x,
InternVL meta JSON + LLaVA conversations for S2), packed to the stage's sequence length. The first
``--warmup`` steps are left out (allocator, autotuning, first-touch); the rest are reported as the mean of the
trainer's own metric windows. Results: a table, and JSON under ``benchmarks/results/`` with git sha, device and
versions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evip.config import from_dict
from evip.data.synthetic import WORDS, write_random_dataset
from evip.job import JobConfig
from evip.train import Trainer
from mono import MonoInternVLConfig
from mono.tokenization import train_bpe_tokenizer

from .common import RESULTS_DIR, device_tag, environment, git_state

# name -> (llm sizes, vision width, tile size, sequence length, tiles per image)
SIZES = {
    "tiny": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2), 16, 56, 512, 4),
    "small": (dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2), 128, 112, 1024, 4),
    "2b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                num_key_value_heads=8, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0}),
           1024, 448, 2048, 6),
}
def model_folder(folder: Path, size: str, tokenizer) -> Path:
    llm, cv, image, _, _ = SIZES[size]
    vocab = 92553 if size == "2b" else len(tokenizer)
    config = MonoInternVLConfig(
        vision_config={"hidden_size": cv, "image_size": image, "patch_size": 14},
        llm_config={**llm, "vocab_size": vocab, "max_position_embeddings": 32768 if size == "2b" else 4096,
                    "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                    "eos_token_id": tokenizer.eos_token_id},
        force_image_size=image, template="internlm2-chat",
        img_context_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(folder / "config.json"))
    tokenizer.save_pretrained(folder)
    return folder


def run_stage(stage: str, size: str, steps: int, warmup: int, work: Path, tokenizer, args) -> dict:
    _, _, image, seq, tiles = SIZES[size]
    data = write_random_dataset(work / f"data-{stage}", "pairs" if stage.startswith("s1") else "conversations",
                         num=args.samples, size=image)
    model_dir = model_folder(work / "model", size, tokenizer)
    job = from_dict(JobConfig, {
        "stage": stage, "output_dir": str(work / f"run-{stage}"),
        "model": {"config": str(model_dir / "config.json"), "tokenizer": str(model_dir),
                  "moe_backend": args.backend},
        "data": {"datasets": [data], "max_seq_len": seq, "max_tiles": tiles, "packing": True,
                 "num_workers": args.workers},
        "schedule": {"steps": steps},
        "parallel": {"activation_checkpointing": args.activation_checkpointing},
        "checkpoint": {"every": 10**9, "export": False},
        "logging": {"every": warmup, "progress": "off", "tensorboard": False, "peak_tflops": args.peak_tflops},
    })
    trainer = Trainer(job)
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(job.output_dir) / "metrics.jsonl").read_text().splitlines()]
    measured = rows[1:] or rows  # the first window holds the warm-up steps
    keys = ("tokens_per_s_device/text", "tokens_per_s_device/visual", "tflops_per_device", "mfu", "mfu/ffn",
            "flops/ffn_share", "data_wait_share", "time/step_s", "mem/peak_gib", "loss")
    out = {k: float(np.mean([r[k] for r in measured if r.get(k) is not None])) for k in keys
           if any(r.get(k) is not None for r in measured)}
    out.update(stage=stage, size=size, steps=steps, warmup_steps=warmup, wall_s=wall, seq_len=seq,
               trainable_groups=list(job.trainable_groups))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="default: 2b on CUDA, small on CPU")
    parser.add_argument("--stages", nargs="+", default=["s1.1", "s2"])
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 20 GPU, 6 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out (default 5 GPU, 2 CPU)")
    parser.add_argument("--samples", type=int, default=256, help="synthetic samples per stage")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers")
    parser.add_argument("--backend", default=None, help="routed-FFN backend (default: kernels' choice)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device peak (MFU)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    size = args.size or ("2b" if cuda else "small")
    measured, warmup = args.steps or (20 if cuda else 6), args.warmup or (5 if cuda else 2)
    tokenizer = train_bpe_tokenizer(" ".join(WORDS) + " . ? , \n", vocab_size=400)
    work = Path(tempfile.mkdtemp(prefix="evip-bench-"))
    results = []
    try:
        for stage in args.stages:
            res = run_stage(stage, size, warmup + measured, warmup, work, tokenizer, args)
            results.append(res)
            mfu = f"{100 * res['mfu']:.1f}%" if "mfu" in res else "n/a (no device peak)"
            print(f"{stage:5s} {size}: text {res['tokens_per_s_device/text']:.0f} tok/s, visual "
                  f"{res['tokens_per_s_device/visual']:.0f} tok/s per device, {res['time/step_s']:.3f} s/step, "
                  f"{res['tflops_per_device']:.3g} TFLOP/s, MFU {mfu}, data wait "
                  f"{100 * res['data_wait_share']:.0f}%, peak mem {res['mem/peak_gib']:.2f} GiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.device("cuda" if cuda else "cpu")
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"evip_step_{device_tag(env, device)}_{size}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": "evip_step", "git": git_state(), "env": env, "results": results,
                                "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
