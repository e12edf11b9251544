"""The data pipeline: sources -> preprocessor -> collator -> loader (see :mod:`evip.data.types` for the records)."""

from .check import check_dataset, check_sources
from .preprocess import IGNORE_INDEX, Preprocessor, jpeg_reencode, tokens_per_tile
from .sources import JsonlSource, Source, WebDatasetSource, build_sources, meta_sources, parse_conversation
from .types import SKIP_REASONS, Batch, Example, ImageRef, RawSample, SkipCounter, SkipSample
