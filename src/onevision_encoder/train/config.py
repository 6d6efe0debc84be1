"""The settings of a training run: a YAML or JSON file, each key also settable on the command line.

Sections (every key has a default except the heads):

- `run`: output folder, steps, seed, how often to log and save, how many checkpoints to keep.
- `model`: a checkpoint to start from (`init`: local folder or hub id) or the config of a new model.
- `optim`: AdamW and the learning-rate schedule.
- `stages`: image size by step range (published: 224 px, then 448 px).
- `heads`: one entry per dataset, each with its own concept bank, labels and loss weight.

`--set optim.lr=1e-4 --set heads.0.batch_size=16` overrides a key by its dotted path (values are read as
YAML: numbers, booleans, lists). A key that does not exist is a `ConfigError` naming it and the keys
that do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """A training config that cannot be used: unknown key, wrong type or value."""


@dataclass
class RunConfig:
    out: str = "runs/ove"
    steps: int = 1000  # optimiser steps in all (the sum of the stages' steps when stages are given)
    seed: int = 0
    log_every: int = 10
    save_every: int = 500  # also at the last step
    keep_last: int = 3  # checkpoints kept; older ones are deleted once a newer one is complete
    progress: bool = True  # progress bar on rank 0


@dataclass
class ModelConfig:
    init: str | None = None  # published checkpoint (folder or hub id) to continue from; None: from scratch
    config: dict = field(default_factory=dict)  # OneVisionEncoderConfig keys of a new model (init None)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    decay_everything: bool = False  # published: decay on norms, biases and the probe too
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_fraction: float = 0.1  # of all steps; warmup_steps, when set, wins
    warmup_steps: int | None = None
    power: float = 2.0  # polynomial decay after the warm-up
    clip_norm: float = 5.0  # backbone, and each head's centres on their own


@dataclass
class StageConfig:
    steps: int = 1000
    image_size: int = 224


@dataclass
class VideoMix:
    """How a batch of videos is split between the three forms (fractions, normalised to sum to 1)."""

    codec: float = 0.5  # codec-selected patch list: `budget` patches of `frames` frames
    frames: float = 0.375  # `clip_frames` whole frames, one random frame per bin of the `frames` grid
    collage: float = 0.125  # the same kind of frames stacked vertically as one image at t = 0


@dataclass
class HeadConfig:
    name: str = "images"
    inputs: list = field(default_factory=list)  # folders, CSV/JSONL lists, `ove encode` folders or .tar shards
    labels: str | None = None  # [N, k] int64 (.npy or .safetensors), aligned with the inputs' order
    bank: str | None = None  # concept bank (`ove concepts build`): its number of centres sizes the head
    num_classes: int | None = None  # instead of a bank
    weight: float = 1.0
    batch_size: int = 32  # the global batch of a step, split evenly over the ranks
    labels_per_step: int = 8
    sample_rate: float = 0.1
    margin: float = 0.3
    scale: float = 64.0
    negative_threshold: float = 0.75
    frames: int = 64
    budget: int = 2048
    clip_frames: int = 8
    video_size: int = 224
    video_mix: VideoMix = field(default_factory=VideoMix)
    workers: int = 0  # loading threads; 0 loads in the training loop's thread


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "auto"  # auto (bf16 autocast on GPU, float32 on CPU), bf16, fp16, fp32
    strategy: str = "ddp"  # ddp or fsdp (several ranks)
    stages: list[StageConfig] = field(default_factory=list)
    heads: list[HeadConfig] = field(default_factory=list)

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages) if self.stages else self.run.steps

    def image_size_at(self, step: int) -> int:
        """Image size of the stage that optimiser step `step` (0-based) belongs to."""
        end = 0
        for stage in self.stages:
            end += stage.steps
            if step < end:
                return stage.image_size
        return self.stages[-1].image_size if self.stages else StageConfig().image_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
STRATEGIES = ("ddp", "fsdp")


def _build(cls, data, where: str):
    """A `cls` dataclass from a mapping, every value checked against the declared type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])!r}; {where or 'the top level'} has: "
                          f"{', '.join(names)}")
    return cls(**{k: _value(hints[k], v, _join(where, k)) for k, v in data.items()})


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _value(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_value(args[0], v, f"{where}.{i}") for i, v in enumerate(value)] if args else value
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        return _value(next(a for a in args if a is not type(None)), value, where)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    return _scalar(hint, value, where)


def _scalar(hint, value, where: str):
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float):
        # YAML reads "1e-4" as a string (YAML 1.1 wants a dot); accept any number written as text
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if hint is int:
            if float(number) != int(number):
                raise ConfigError(f"{where} must be a whole number, got {value!r}")
            return int(number)
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be text, got {value!r}")
        return value
    return value


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping in a `.json`, `.yaml` or `.yml` file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """`a.b.0.c=value` into the nested mapping `data` (value read as YAML). Lists are indexed by number; a
    head index one past the end adds a head."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set needs KEY=VALUE, got {assignment!r}")
    value = yaml.safe_load(text) if text else ""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} has {len(node)} entries, no {part!r}")
            if int(part) == len(node):
                node.append({})
            if last:
                node[int(part)] = value
            node = node[int(part)]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {} if not parts[i + 1].isdigit() else [])


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The config of `path` (or the defaults) with the `--set` overrides applied, checked."""
    data = read_config_file(path) if path is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    config = _build(TrainConfig, data, "")
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {config.strategy!r}")
    if config.model.init is not None and config.model.config:
        raise ConfigError("give model.init (a checkpoint to continue) or model.config (a new model), not both")
    if not config.heads:
        raise ConfigError("the config has no heads: give at least one under 'heads' (inputs, labels, bank)")
    if config.total_steps() < 1:
        raise ConfigError(f"nothing to train: {config.total_steps()} steps")
    names = [h.name for h in config.heads]
    if len(set(names)) != len(names):
        raise ConfigError(f"head names must differ, got {names}")
    for i, head in enumerate(config.heads):
        where = f"heads.{i} ({head.name})"
        if not head.inputs:
            raise ConfigError(f"{where}: no inputs")
        if (head.bank is None) == (head.num_classes is None):
            raise ConfigError(f"{where}: give exactly one of bank and num_classes")
        if head.batch_size < 1 or head.labels_per_step < 1:
            raise ConfigError(f"{where}: batch_size and labels_per_step must be >= 1")
        mix = head.video_mix
        if min(mix.codec, mix.frames, mix.collage) < 0 or mix.codec + mix.frames + mix.collage <= 0:
            raise ConfigError(f"{where}: video_mix fractions must be >= 0 and not all 0, got {mix}")
    for key in ("log_every", "save_every", "keep_last"):
        if getattr(config.run, key) < 1:
            raise ConfigError(f"run.{key} must be >= 1")
