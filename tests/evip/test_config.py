"""Typed YAML configs: unknown keys, wrong types and missing keys are errors naming the key, file and line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from evip.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclass
class Data:
    meta: Path
    max_tiles: int = 6
    weighting: Literal["token", "sample", "square"] = "token"
    shards: list[str] = field(default_factory=list)


@dataclass
class Run:
    stage: str
    optim: Optim
    data: Data
    seed: int = 0
    wandb_project: str | None = None
    pack: bool = True

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError("seed must be >= 0")


GOOD = """\
stage: s1.1
seed: 3
optim:
  lr: 2.0e-4
  betas: [0.9, 0.95]
data:
  meta: data/meta.json
  shards: [a.tar, b.tar]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_load_builds_typed_tree_and_round_trips(tmp_path):
    cfg = load_config(Run, _write(tmp_path, GOOD))
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.data.meta == Path("data/meta.json")
    assert cfg.data.shards == ["a.tar", "b.tar"] and cfg.data.max_tiles == 6 and cfg.wandb_project is None
    saved = save_config(cfg, tmp_path / "out" / "resolved.yaml")
    assert load_config(Run, saved) == cfg
    assert to_dict(cfg)["data"]["meta"] == "data/meta.json"


def test_int_is_accepted_for_float_and_nothing_else_is_coerced():
    assert from_dict(Optim, {"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match=r"key 'lr': expected float, got str '1e-4'"):
        from_dict(Optim, {"lr": "1e-4"})
    with pytest.raises(ConfigError, match=r"key 'pack': expected bool, got int"):
        from_dict(Run, {"stage": "s2", "optim": {"lr": 1.0}, "data": {"meta": "m"}, "pack": 1})


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = _write(tmp_path, GOOD.replace("  lr: 2.0e-4", "  lrr: 2.0e-4"))
    with pytest.raises(ConfigError) as err:
        load_config(Run, path)
    assert f"{path}:4: key 'optim.lrr'" in str(err.value) and "did you mean 'lr'?" in str(err.value)


def test_wrong_type_nested_names_key_and_line(tmp_path):
    path = _write(tmp_path, GOOD.replace("[a.tar, b.tar]", "[a.tar, 7]"))
    with pytest.raises(ConfigError, match=rf"{path}:8: key 'data.shards\[1\]': expected str, got int 7"):
        load_config(Run, path)
    path = _write(tmp_path, GOOD + "  weighting: mean\n")
    with pytest.raises(ConfigError, match=r"key 'data.weighting': expected 'token' \| 'sample' \| 'square'"):
        load_config(Run, path)
    path = _write(tmp_path, GOOD.replace("[0.9, 0.95]", "[0.9]"))
    with pytest.raises(ConfigError, match=r"key 'optim.betas'.*2 items needed"):
        load_config(Run, path)


def test_missing_required_key(tmp_path):
    path = _write(tmp_path, GOOD.replace("  meta: data/meta.json\n", ""))
    with pytest.raises(ConfigError, match=r"missing required key\(s\) 'data.meta' for Data"):
        load_config(Run, path)


def test_overrides_dotted_typed_and_checked(tmp_path):
    path = _write(tmp_path, GOOD)
    cfg = load_config(Run, path, ["optim.lr=1e-5", "data.max_tiles=12", "wandb_project=evip", "pack=false"])
    assert (cfg.optim.lr, cfg.data.max_tiles, cfg.wandb_project, cfg.pack) == (1e-5, 12, "evip", False)
    with pytest.raises(ConfigError, match=r"override 'optim.lrr=1': key 'optim.lrr': unknown key"):
        load_config(Run, path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(Run, path, ["optim.lr"])
    with pytest.raises(ConfigError, match="'stage' is not a mapping"):
        apply_overrides({"stage": "s1.1"}, ["stage.x=1"])


def test_yaml_syntax_error_and_validation_error_are_located(tmp_path):
    path = _write(tmp_path, GOOD + "data: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: not valid YAML"):
        load_config(Run, path)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        load_config(Run, _write(tmp_path, GOOD.replace("seed: 3", "seed: -1")))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Run, tmp_path / "missing.yaml")


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    """PyYAML's YAML 1.1 reads ``1e-4`` as a string; learning rates are written that way, so we read a float."""
    cfg = load_config(Run, _write(tmp_path, GOOD.replace("2.0e-4", "3e-4")))
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert load_config(Run, _write(tmp_path, GOOD), ["optim.weight_decay=1E-2"]).optim.weight_decay == 0.01


def test_only_true_and_false_are_booleans(tmp_path):
    from evip.job import JobConfig

    path = tmp_path / "stage.yaml"
    path.write_text("stage: s1.1\noutput_dir: x\nlogging:\n  progress: off\n  tensorboard: false\n")
    job = load_config(JobConfig, path, ["parallel.activation_checkpointing=true"])
    assert job.logging.progress == "off" and job.logging.tensorboard is False
    assert job.parallel.activation_checkpointing is True
    assert load_config(JobConfig, path, ["logging.progress=on"]).logging.progress == "on"
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        load_config(JobConfig, path, ["logging.tensorboard=yes"])  # 'yes' is a string, not a bool
