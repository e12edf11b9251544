"""Write what configs/evip/smoke/ trains on: a random tiny LLM with a small BPE tokenizer, and random datasets.

    python scripts/make_smoke_data.py runs/smoke/data
    evip run configs/evip/smoke/recipe.yaml

Nothing is learned from random data; the smoke recipe shows the whole chain (S1.1 -> S1.2 -> S1.3 -> S2) running
in about a minute on a CPU. `make demo` (issue 5) trains on data that can be learned.
"""

import sys
from pathlib import Path

from evip.data.synthetic import WORDS, write_random_dataset, write_random_llm
from mono.tokenization import train_bpe_tokenizer


def main(out: str = "runs/smoke/data") -> None:
    root = Path(out)
    tokenizer = train_bpe_tokenizer(" ".join(WORDS) + " . ? , \n", vocab_size=400)
    write_random_llm(root / "llm", tokenizer)
    write_random_dataset(root / "pairs", "pairs", num=64, size=56)
    write_random_dataset(root / "convs", "conversations", num=64, size=56)
    print(f"wrote {root}/llm, {root}/pairs (webdataset), {root}/convs/meta.json (meta + LLaVA JSONL)")


if __name__ == "__main__":
    main(*sys.argv[1:])
