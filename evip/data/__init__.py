"""The data pipeline: sources -> preprocessor -> collator -> loader (see :mod:`evip.data.types` for the records).

- :mod:`.sources`: webdataset shards, JSONL pairs / conversations, InternVL meta JSON; random access by index.
- :mod:`.preprocess`: tiling, JPEG re-encode, chat template, tokenization, label masking, per-sample checks.
- :mod:`.collate`: packing (attention isolated per sample, positions restarting) or padding into a ``Batch``.
- :mod:`.loader`: the deterministic, sharded, resumable stream of batches with per-reason skip accounting.
- :mod:`.check`: ``evip data check``, the offline validator.
- :mod:`.synthetic`: random datasets and a random LLM for smoke runs and benchmarks.
"""

from .check import check_dataset, check_sources
from .collate import Packer, collate, loss_weights
from .loader import TrainLoader, merge_states
from .preprocess import IGNORE_INDEX, Preprocessor, jpeg_reencode, tokens_per_tile
from .sources import JsonlSource, Source, WebDatasetSource, build_sources, meta_sources, parse_conversation
from .types import SKIP_REASONS, Batch, Example, ImageRef, RawSample, SkipCounter, SkipSample
