"""The two published training stages of the OneVision LLaVA model, on transformers' `Trainer`.

- Stage 1 (alignment): only the projector trains; lr 1e-3, cosine schedule, 3% warm-up.
- Stage 2 (fine-tuning): everything trains; lr 1e-5, the vision tower 2e-6 (its own parameter group).

Both read LLaVA conversation data (`data.py`) and group each step's batches by modality and length. One
YAML or JSON file configures a run (`ove lmm train CONFIG`); its `training` mapping goes to
`TrainingArguments` over the stage's defaults, so distribution is the Trainer's own: launch with `torchrun`
or `accelerate launch` and set `deepspeed: ds_config.json` (ZeRO-3 as published for stage 2) or
`fsdp: full_shard auto_wrap` with an `fsdp_config` there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from ..train.config import read_config_file
from .data import ConversationCollator, ConversationDataset, ModalityLengthGroupedSampler, load_conversations

WARMUP = 0.03
STAGES = {1: {"learning_rate": 1e-3, "vision_tower_lr": None}, 2: {"learning_rate": 1e-5, "vision_tower_lr": 2e-6}}


@dataclass
class TrainConfig:
    """One training run. `model`: an OneVision LLaVA checkpoint directory (ours, e.g. from `ove lmm convert`);
    `processor`: its processor (default: the same directory). `vision_tower_lr`: default the stage's (stage 2:
    2e-6). `training`: any `TrainingArguments` fields, over the stage's defaults."""

    model: str
    data: str
    output_dir: str
    stage: int = 1
    processor: str | None = None
    image_folder: str | None = None
    video_folder: str | None = None
    max_length: int | None = 8192
    cache_visual: bool = False
    group_by_modality_length: bool = True
    vision_tower_lr: float | None = None
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be 1 (projector only) or 2 (everything), got {self.stage!r}")
        if not isinstance(self.training, dict):
            raise ValueError(f"training must be a mapping of TrainingArguments fields, got "
                             f"{type(self.training).__name__}")
        if self.vision_tower_lr is None:
            self.vision_tower_lr = STAGES[self.stage]["vision_tower_lr"]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        path = os.fspath(path)
        values = read_config_file(path)  # the pretraining config's reader: JSON or YAML, one mapping
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
        missing = sorted(k for k in ("model", "data", "output_dir") if k not in values)
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}")
        return cls(**values)


def training_arguments(config: TrainConfig) -> TrainingArguments:
    """The stage's defaults (lr, cosine, 3% warm-up, no weight decay), then the config's `training` mapping."""
    names = {f.name for f in fields(TrainingArguments)}
    # transformers 4.x names the warm-up fraction warmup_ratio; 5.x takes a fraction as warmup_steps.
    warmup = {"warmup_ratio": WARMUP} if "warmup_ratio" in names else {"warmup_steps": WARMUP}
    values = {"learning_rate": STAGES[config.stage]["learning_rate"], "lr_scheduler_type": "cosine",
              "weight_decay": 0.0, "report_to": "none", **warmup, **config.training, "output_dir": config.output_dir}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"training: unknown TrainingArguments field(s) {unknown}")
    if values.get("remove_unused_columns"):
        raise ValueError("training: remove_unused_columns must stay False (the collator needs each sample's items)")
    return TrainingArguments(**{**values, "remove_unused_columns": False})


def set_trainable(model, stage: int) -> None:
    """Stage 1: the projector only; stage 2: every parameter."""
    for name, param in model.named_parameters():
        param.requires_grad_(stage == 2 or name.startswith("multi_modal_projector."))
    if stage == 1:
        # With the LM frozen, a text-only batch has no path to a trainable tensor (and under reentrant
        # checkpointing no LM layer input requiring grad): the LM's token embeddings' output requires it. Not
        # the tower's (as enable_input_require_grads does on transformers 5), which would backpropagate
        # through the whole frozen tower for nothing.
        model.get_input_embeddings().register_forward_hook(_output_requires_grad)


def _output_requires_grad(module, inputs, output):
    return output.requires_grad_(True)


class OneVisionLlavaTrainer(Trainer):
    """`Trainer` with the vision tower in its own parameter group and batches grouped by modality and length."""

    def __init__(self, *args, vision_tower_lr: float | None = None, group_by_modality_length: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.vision_tower_lr, self.group_by_modality_length = vision_tower_lr, group_by_modality_length
        self._tower_group_split = False

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.vision_tower_lr is not None and not self._tower_group_split:
            split_parameter_group(optimizer, self.model, "vision_tower.", self.vision_tower_lr)
            self._tower_group_split = True
        return optimizer

    def _get_train_sampler(self, *args, **kwargs):
        dataset = self.train_dataset
        if self.group_by_modality_length and isinstance(dataset, ConversationDataset):
            return ModalityLengthGroupedSampler(dataset.modalities, dataset.lengths,
                                                self.args.per_device_train_batch_size, self.args.world_size,
                                                seed=self.args.seed)
        return super()._get_train_sampler(*args, **kwargs)


def split_parameter_group(optimizer, model, prefix: str, lr: float) -> None:
    """Move the parameters whose name contains `prefix` out of each group into a twin group with its own lr
    (before any step: the optimizer has no state yet; schedulers then scale every group alike)."""
    chosen = {id(p) for name, p in model.named_parameters() if prefix in name}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in chosen]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in chosen]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved, "lr": lr})


def train(config: TrainConfig) -> Trainer:
    """Run one stage; the trained model and its processor are saved to `config.output_dir`."""
    args = training_arguments(config)  # bad settings and data fail before any model is loaded
    conversations = load_conversations(config.data, config.image_folder, config.video_folder)
    try:
        processor = AutoProcessor.from_pretrained(config.processor or config.model)
        model = AutoModelForImageTextToText.from_pretrained(config.model)
    except (OSError, ValueError) as e:  # transformers' several lines (hub, cache, offline mode), or on 4.x the
        # hub's repo-id check, for a folder that is not there
        raise OSError(f"model {config.model!r} cannot be loaded: {str(e).splitlines()[0]}") from None
    set_trainable(model, config.stage)
    dataset = ConversationDataset(conversations, processor, config.max_length, config.cache_visual)
    trainer = OneVisionLlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=ConversationCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        vision_tower_lr=config.vision_tower_lr,
        group_by_modality_length=config.group_by_modality_length,
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    processor.save_pretrained(config.output_dir)
    return trainer
