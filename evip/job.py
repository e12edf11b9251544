"""The configuration of a training job: one dataclass per concern, read from YAML by :mod:`evip.config`.

A *stage job* (``evip train stage.yaml``) trains one stage; a *recipe* (``evip run recipe.yaml``) chains stage
jobs, each starting from the model the previous one exported. Fields left ``None`` take the stage's default from
:mod:`evip.stages` (learning rate, warm-up, tile cap, sequence length, loss weighting, trainable groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .stages import PARAM_GROUPS, STAGES, stage_spec

__all__ = [
    "CheckpointConfig", "DataConfig", "DatasetConfig", "JobConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "ParallelConfig", "RecipeConfig", "RecipeStage", "ScheduleConfig",
]


@dataclass
class ModelConfig:
    """Where the model comes from and how it is built."""

    init: Optional[Path] = None
    """A plain LLM (HF folder in InternLM2 or Llama-family layout, or a ``.gguf`` file) for a stage whose init is
    ``llm``, or a Mono-InternVL folder (release layout) otherwise. In a recipe, later stages get the previous
    stage's export."""
    tokenizer: Optional[Path] = None
    """Tokenizer folder or ``.gguf`` file; default: ``init``."""
    config: Optional[Path] = None
    """Instead of ``init``: a Mono-InternVL ``config.json`` to build with random weights (benchmarks)."""
    vision_hidden_size: Optional[int] = None
    """Patch-embedding width Cv for a new model (default ``min(1024, hidden_size)``)."""
    image_size: int = 448
    """Tile size S of a new model."""
    patch_size: int = 14
    """Patch size of a new model."""
    template: Optional[str] = None
    """Chat template of a new model (default: chosen from the tokenizer, see ``mono.conversion``)."""
    system_message: Optional[str] = None
    """System message rendered into every training conversation (default: the template's)."""
    visual_attention_experts: bool = False
    """Give visual tokens their own attention projections (Mono-InternVL-1.5 style)."""
    moe_backend: Optional[str] = None
    """Routed-FFN backend (``torch``, ``triton``, ``megablocks``); default: ``kernels.select_backend``'s choice."""


@dataclass
class DatasetConfig:
    """One dataset of the mixture."""

    path: Path
    """``webdataset``: a shard file, a folder of ``*.tar`` shards or a glob; ``jsonl``: a JSONL file of pairs or
    conversations; ``meta``: an InternVL meta JSON (each of its entries becomes a dataset)."""
    format: Literal["webdataset", "jsonl", "meta"]
    """How ``path`` is read."""
    name: Optional[str] = None
    """Name in logs and skip reports (default: the file name)."""
    image_root: Optional[Path] = None
    """Folder that relative image paths of a JSONL file are resolved against (default: the file's folder)."""
    repeat: float = 1.0
    """Times each sample is used per epoch (1.5 = every sample once plus the first half again); a fraction below 1
    takes the first share of the samples, as InternVL's `repeat_time` does."""
    max_tiles: Optional[int] = None
    """Dynamic-tiling cap for this dataset (default: the data config's)."""
    augment: bool = False
    """Random JPEG re-encode (quality 75..100) of this dataset's images."""


@dataclass
class DataConfig:
    """The data mixture and how samples become batches."""

    datasets: list[DatasetConfig] = field(default_factory=list)
    """The mixture; samples of all datasets are shuffled together."""
    max_seq_len: Optional[int] = None
    """Token cap of a sample and of a pack (default: the stage's). Longer samples are skipped, never cut, and so are
    samples longer than the model's context; a pack may exceed the context (positions restart at every sample)."""
    max_tiles: Optional[int] = None
    """Default dynamic-tiling cap (default: the stage's)."""
    min_tiles: int = 1
    """Minimum number of tiles of dynamic tiling."""
    use_thumbnail: bool = True
    """Append a whole-image thumbnail tile when an image has more than one tile."""
    packing: bool = True
    """Pack several samples into each row (attention isolated per sample, positions restarting)."""
    micro_batch_size: int = 1
    """Rows per micro-batch (packs when packing, samples otherwise)."""
    num_workers: int = 0
    """Dataloader worker processes per rank."""
    shuffle: bool = True
    """Shuffle samples (seeded, new order each epoch)."""
    seed: int = 0
    """Seed of the order and of the per-sample augmentation."""
    log_skips: int = 10
    """Skipped samples printed in full (file and sample id) per reason by rank 0; all are counted, and all are
    written to ``<output_dir>/skipped-rank<r>.jsonl``."""
    caption_prompt: str = "Provide a one-sentence caption for the provided image."
    """User turn of an image-text pair (S1.1/S1.2): the pair is trained as ``<image>\\n{prompt}`` -> caption, in
    the model's chat template, so only the caption and its closing token are supervised."""

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.max_tiles is not None and self.max_tiles < 1 or self.min_tiles < 1:
            raise ValueError(f"max_tiles and min_tiles must be >= 1, got {self.max_tiles}, {self.min_tiles}")


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters only."""

    lr: Optional[float] = None
    """Peak learning rate (default: the stage's)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    """Decoupled weight decay, applied to matrices only (not to norms, biases, embeddings of position)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"need eps > 0, weight_decay >= 0, grad_clip >= 0; got {self.eps}, {self.weight_decay}, "
                f"{self.grad_clip}"
            )


@dataclass
class ScheduleConfig:
    """Steps, accumulation and the learning-rate schedule."""

    steps: int = 100
    """Optimizer steps of the stage."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    warmup_ratio: Optional[float] = None
    """Share of steps with linear warm-up (default: the stage's)."""
    min_lr_ratio: float = 0.0
    """Cosine decays to ``lr * min_lr_ratio``."""
    max_nonfinite: int = 5
    """Steps in a row with a non-finite loss or gradient after which the run aborts (each one is skipped)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {self.max_nonfinite}")


@dataclass
class ParallelConfig:
    """Devices, sharding, precision."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available (NCCL), else CPU (gloo)."""
    fsdp: bool = True
    """Shard with FSDP2 (``fully_shard`` per decoder layer, then the root) when more than one rank runs. ``false``
    with several ranks: replicated data parallelism (each rank a whole copy, gradients averaged in one flat
    all-reduce per step, as DDP), the faster choice for a model that fits each device many times over (the
    demo's, on CPU cores)."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 compute with fp32 master weights and fp32 gradient reduction on CUDA, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass."""


@dataclass
class CheckpointConfig:
    """DCP checkpoints while training, a release-layout export at the end."""

    every: int = 500
    """Save every this many steps (and always at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept."""
    resume: bool = True
    """Resume from the newest complete checkpoint of the run folder if there is one."""
    export: bool = True
    """Export the final model as a release-layout HF folder (``<output_dir>/export``)."""
    export_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights of the export: ``auto`` = bfloat16 when trained in bf16 mixed precision (the release format), else
    float32 (CPU runs keep full precision, so frozen weights stay bit-identical across stages)."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ValueError(f"every and keep_last must be >= 1, got every={self.every}, keep_last={self.keep_last}")


@dataclass
class LoggingConfig:
    """What is reported."""

    every: int = 10
    """Steps between metric lines (and TensorBoard points)."""
    tensorboard: bool = True
    """Write TensorBoard events under ``<output_dir>/tb``."""
    wandb_project: Optional[str] = None
    """Also log to this Weights & Biases project (needs ``wandb`` installed)."""
    progress: Literal["auto", "on", "off"] = "auto"
    """A progress bar on rank 0 (``auto``: when stderr is a terminal)."""
    peak_tflops: Optional[float] = None
    """Peak dense bf16 TFLOP/s of one device, for MFU (default: looked up from the GPU name; none on CPU)."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0, got {self.peak_tflops}")


@dataclass
class JobConfig:
    """One stage of training (``evip train``)."""

    stage: str
    """``s1.1``, ``s1.2``, ``s1.3`` or ``s2``."""
    output_dir: Path
    """Run folder: resolved config, checkpoints, TensorBoard, skip log, export."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainable: Optional[list[str]] = None
    """Parameter groups to train (default: the stage's; S2 may name a subset)."""
    loss_weighting: Optional[Literal["token", "sample", "square"]] = None
    """Default: the stage's."""
    delta_tuning: bool = True
    """Train only the stage's groups (the method: the LLM stays frozen through S1.1 and S1.2). ``false`` is the
    ablation: every parameter trains in every stage, so the forgetting delta tuning avoids can be measured."""
    seed: int = 0
    """Seed of the new parameters and of dropout-free training randomness."""

    def __post_init__(self) -> None:
        stage_spec(self.stage)  # ValueError naming the stages

    # ------------------------------------------------------------------------------ stage defaults resolved
    @property
    def spec(self):
        return STAGES[self.stage.strip().lower()]

    @property
    def lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else self.spec.lr

    @property
    def warmup_ratio(self) -> float:
        return self.schedule.warmup_ratio if self.schedule.warmup_ratio is not None else self.spec.warmup_ratio

    @property
    def max_seq_len(self) -> int:
        return self.data.max_seq_len if self.data.max_seq_len is not None else self.spec.max_seq_len

    @property
    def max_tiles(self) -> int:
        return self.data.max_tiles if self.data.max_tiles is not None else self.spec.max_tiles

    @property
    def weighting(self) -> str:
        return self.loss_weighting if self.loss_weighting is not None else self.spec.loss_weighting

    @property
    def trainable_groups(self) -> tuple[str, ...]:
        if not self.delta_tuning:
            return tuple(PARAM_GROUPS)
        return tuple(self.trainable) if self.trainable is not None else self.spec.trainable


@dataclass
class RecipeStage:
    """One entry of a recipe: a stage YAML (relative to the recipe file) and overrides for it."""

    config: Path
    overrides: list[str] = field(default_factory=list)
    name: Optional[str] = None
    """The run's name: its folder under the recipe's ``output_dir`` and its label in logs and reports (default: the
    stage, e.g. ``s1.3``). Names must differ, so one stage may run twice under two names (a curriculum: S1.3 on
    one task first, then on the full mixture)."""

    def __post_init__(self) -> None:
        if self.name is not None and (not self.name or self.name in (".", "..") or "/" in self.name
                                      or "\\" in self.name):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")


@dataclass
class RecipeConfig:
    """A chain of stages (``evip run``): stage k+1 starts from stage k's export."""

    output_dir: Path
    """Each stage runs in ``<output_dir>/<name>`` (the name defaults to the stage); the last export is
    ``<output_dir>/<last name>/export``."""
    stages: list[RecipeStage]
    init: Optional[Path] = None
    """The first stage's ``model.init`` (overrides the stage file's)."""
    overrides: list[str] = field(default_factory=list)
    """Overrides applied to every stage (before each stage's own)."""
