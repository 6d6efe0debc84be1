"""The training loop of `ove train`: one backbone, several heads (each a dataset with its own concept bank,
labels, Partial-FC loss and weight), DDP over the `torchrun` ranks, checkpoints that resume exactly.

One optimiser step: for each head, its next batch goes through the backbone and the head's loss, whose
weighted value is back-propagated at once (so only one head's activations are alive at a time); DDP syncs
the backbone's gradients in the last head's backward, summing them over ranks, which with the loss's
gradient makes the step the same on any number of ranks (see `loss.py`). Then gradient clipping (the
backbone, and each head's centres over all their shards), AdamW, and the rate of the next step.
"""

from __future__ import annotations

import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from ..encode.encoder import Ranks, _rank_device
from ..processing import save_preprocessor_config
from .checkpoint import Checkpoint, CheckpointWriter, complete_checkpoints, open_run, optimizer_state, \
    optimizer_tensors, remove_partial, restore_rng, rng_states
from .config import TrainConfig
from .data import HeadStream, Loader
from .logging import RunLog, plot_losses
from .loss import PartialFCLoss, reshard_centres
from .parallel import Backbone
from .optim import backbone_optimizer, centre_optimizer, clip_centres, learning_rate, set_learning_rate

CENTRE_BLOCK = 65536  # centres are initialised in blocks of rows, each from its own seed: any sharding, same matrix


def build_model(config: TrainConfig):
    """The backbone in float32: a published checkpoint (`model.init`) or a new one (`model.config`)."""
    import onevision_encoder  # noqa: F401 - registers the model with the Auto classes
    from transformers import AutoModel

    from ..configuration import OneVisionEncoderConfig

    m = config.model
    if m.init is not None:
        model = AutoModel.from_pretrained(m.init, dtype=torch.float32, attn_implementation=m.attn_implementation)
    else:
        model = AutoModel.from_config(OneVisionEncoderConfig(**m.config), attn_implementation=m.attn_implementation)
    model = model.float()
    if m.gradient_checkpointing:
        no_reentrant = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; 4.57 has only the old one
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
    if not model.config.use_head:
        raise ValueError("training needs the pooling head (model config use_head: true): the loss uses pooler_output")
    return model


def bank_size(head) -> int:
    if head.num_classes is not None:
        return head.num_classes
    from safetensors import safe_open

    if not os.path.isfile(head.bank):
        raise FileNotFoundError(f"head {head.name}: concept bank {head.bank} does not exist")
    with safe_open(head.bank, "pt") as f:
        if "centres" not in f.keys():
            raise ValueError(f"head {head.name}: {head.bank} has no 'centres' tensor: not a concept bank")
        return f.get_slice("centres").get_shape()[0]


def init_centres(loss: PartialFCLoss, seed: int, head_index: int) -> None:
    """N(0, 0.01) rows that depend only on the seed and the row's block, not on the sharding."""
    start, stop = loss.shard
    rows = []
    for block in range(start // CENTRE_BLOCK, (stop - 1) // CENTRE_BLOCK + 1):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + head_index) * 1_000_003 + block)
        values = torch.randn(CENTRE_BLOCK, loss.embedding_dim, generator=generator) * 0.01
        lo = max(start, block * CENTRE_BLOCK) - block * CENTRE_BLOCK
        hi = min(stop, (block + 1) * CENTRE_BLOCK) - block * CENTRE_BLOCK
        rows.append(values[lo:hi])
    with torch.no_grad():
        loss.centres.copy_(torch.cat(rows))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.device = _rank_device(None)
        self.ranks = Ranks(self.device)
        self.rank, self.world_size = self.ranks.rank, self.ranks.world_size
        out = config.run.out
        self.run_id = self._agree(open_run(out, config, self.rank == 0))
        self.total_steps = config.total_steps()

        seed_everything(config.run.seed)  # the same new model on every rank
        model = build_model(config).to(self.device)
        self.backbone = model
        dim = model.config.hidden_size
        self.losses, self.streams = [], []
        loader_args = dict(patch_size=model.config.patch_size, image_size=config.image_size_at(0))
        for i, head in enumerate(config.heads):
            loss = PartialFCLoss(bank_size(head), dim, sample_rate=head.sample_rate, margin=head.margin,
                                 scale=head.scale, negative_threshold=head.negative_threshold,
                                 labels_per_step=head.labels_per_step)
            init_centres(loss, config.run.seed, i)
            self.losses.append(loss.to(self.device))
            loader = Loader(**loader_args, frames=head.frames, budget=head.budget, clip_frames=head.clip_frames,
                            video_size=head.video_size)
            self.streams.append(HeadStream(head, loader, loss.num_classes, config.run.seed, self.rank,
                                           self.world_size))
        self.model = Backbone(model, config.strategy, self.world_size, self.device)
        self.optimizer = backbone_optimizer(model, config.optim)
        self.centre_optimizer = centre_optimizer([loss.centres for loss in self.losses], config.optim)
        self.precision = _precision(config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == torch.float16)
        seed_everything(config.run.seed * 1000 + self.rank + 1)  # each rank its own draws from here on
        self.writer = CheckpointWriter(out, self.run_id, self.rank, self.world_size, config.run.keep_last)
        self.step = 0
        self._resume()

    # ------------------------------------------------------------------------------------------
    # Distributed helpers
    # ------------------------------------------------------------------------------------------

    def _agree(self, value: str) -> str:
        """Rank 0's value on every rank (the run id of a new folder)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            x = x.clone()
            dist.all_reduce(x)
        return x

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        out = self.config.run.out
        if self.rank == 0:
            remove_partial(out)
        self.ranks.barrier()
        found = complete_checkpoints(out)
        if not found:
            return
        checkpoint = Checkpoint(found[-1], self.run_id)
        self.model.load_state_dict(checkpoint.model_state())
        self.model.load_optimizer_state_dict(self.optimizer, checkpoint.backbone_optimizer())
        if checkpoint.state.get("scaler"):
            self.scaler.load_state_dict(checkpoint.state["scaler"])
        if checkpoint.world_size == self.world_size:
            tensors, meta = checkpoint.rank_file(self.rank)
            centres = [tensors[f"centres.{h.name}"] for h in self.config.heads]
            self.centre_optimizer.load_state_dict(optimizer_state(tensors, meta["centre_optimizer"], "centre_opt"))
            restore_rng(tensors, meta, self.device)
            data = meta["data"]
        else:
            centres, data = self._reshard(checkpoint)
        with torch.no_grad():
            for loss, shard in zip(self.losses, centres):
                loss.centres.copy_(shard)
        for head, stream in zip(self.config.heads, self.streams):
            stream.restore(data[head.name])
        self.step = checkpoint.step
        if self.rank == 0:
            print(f"ove train: resumed from {checkpoint.folder} (step {self.step}, {checkpoint.world_size} ranks)",
                  file=sys.stderr, flush=True)

    def _reshard(self, checkpoint: Checkpoint):
        """Centre shards and their moments cut again for this number of ranks; RNG and data positions taken
        over from the old rank of the same number when there is one (approximate: see checkpoint.py)."""
        files = checkpoint.all_ranks()
        centres = [reshard_centres([t[f"centres.{h.name}"] for t, _ in files], self.world_size, self.rank)
                   for h in self.config.heads]
        old = [optimizer_state(t, m["centre_optimizer"], "centre_opt") for t, m in files]
        state = old[0]
        for index in state["state"]:
            for key in ("exp_avg", "exp_avg_sq"):
                state["state"][index][key] = reshard_centres([o["state"][index][key] for o in old],
                                                             self.world_size, self.rank)
        self.centre_optimizer.load_state_dict(state)
        mine = files[self.rank] if self.rank < len(files) else None
        if mine is not None:
            restore_rng(mine[0], mine[1], self.device)
        scale = checkpoint.world_size / self.world_size
        data = {}
        for head in self.config.heads:
            first = files[0][1]["data"][head.name]
            data[head.name] = {**first, "consumed": int(first["consumed"] * scale)}
        return centres, data

    def save(self) -> str | None:
        step = self.step
        self.writer.begin(step)
        self.ranks.barrier()
        model_state = self.model.state_dict()  # collective under FSDP
        optimizer_state_dict = self.model.optimizer_state_dict(self.optimizer)
        if self.rank == 0:
            self.writer.write_shared(step, model_state, optimizer_state_dict)
        tensors, meta = rng_states(self.device)
        for head, loss in zip(self.config.heads, self.losses):
            tensors[f"centres.{head.name}"] = loss.centres.detach()
        centre_tensors, centre_meta = optimizer_tensors(self.centre_optimizer.state_dict(), "centre_opt")
        tensors.update(centre_tensors)
        meta["centre_optimizer"] = centre_meta
        meta["data"] = {h.name: s.state() for h, s in zip(self.config.heads, self.streams)}
        self.writer.write_rank(step, tensors, meta)
        self.ranks.barrier()
        folder = None
        if self.rank == 0:
            folder = self.writer.finish(step, {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None})
        self.ranks.barrier()
        return folder

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        config, step = self.config, self.step
        lr = learning_rate(step, config.optim, self.total_steps)
        set_learning_rate(self.optimizer, lr)
        set_learning_rate(self.centre_optimizer, lr)
        image_size = config.image_size_at(step)
        record = {"step": step + 1, "lr": lr}
        total = 0.0
        last = len(self.losses) - 1
        for i, (head, loss_fn, stream) in enumerate(zip(config.heads, self.losses, self.streams)):
            batch = stream.next_batch(image_size)
            for failure in stream.last_failures:
                print(f"ove train: skipped a sample of head {head.name} (rank {self.rank}): {failure}",
                      file=sys.stderr)
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.inputs.items()}
            with self.model.syncing(i == last):
                with torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision != torch.float32):
                    pooled = self.model(**inputs).pooler_output
                loss = loss_fn(pooled.float(), batch.labels.to(self.device))
                self.scaler.scale(loss * head.weight).backward()
            value = float(loss.detach())
            record[f"loss/{head.name}"] = value
            record[f"skipped/{head.name}"] = int(self._sum(torch.tensor(stream.skipped_total, device=self.device)))
            total += head.weight * value
        if not math.isfinite(total):  # before the step: the weights and the last checkpoint stay sound
            raise FloatingPointError(f"the loss is {total} at step {step + 1}")
        self.scaler.unscale_(self.optimizer)
        self.scaler.unscale_(self.centre_optimizer)
        grad_norm = self.model.clip_gradients(config.optim.clip_norm)
        for head, loss_fn in zip(config.heads, self.losses):
            record[f"centre_grad_norm/{head.name}"] = clip_centres(loss_fn.centres, config.optim.clip_norm, self._sum)
        self.scaler.step(self.optimizer)
        self.scaler.step(self.centre_optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.centre_optimizer.zero_grad(set_to_none=True)
        record["loss"] = total
        record["grad_norm"] = grad_norm
        self.step += 1
        return record

    def train(self) -> str:
        """Train to the last step (saving every `save_every`), then write the final model; returns its folder."""
        config, out = self.config, self.config.run.out
        samples = sum(h.batch_size for h in config.heads)
        log = RunLog(out, self.total_steps, self.step, config.run.progress and self.rank == 0, samples) \
            if self.rank == 0 else None
        if log is not None:
            log.truncate(self.step)
        self.backbone.train()
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                if log is not None:
                    log.step_done()
                    if self.step % config.run.log_every == 0 or self.step == self.total_steps:
                        log.write(record)
                if self.step % config.run.save_every == 0 or self.step == self.total_steps:
                    self.save()
        finally:
            if log is not None:
                log.close()
            for stream in self.streams:
                stream.close()
        final = os.path.join(out, "final")
        weights = self.model.state_dict()
        if self.rank == 0:
            self.backbone.save_pretrained(final, state_dict=weights)
            save_preprocessor_config(final, size=config.image_size_at(self.total_steps - 1))
            plot_losses(out)
        self.ranks.barrier()
        self.model.unwrap()  # before the process group goes (`Ranks.close`)
        self.ranks.close()
        return final


def _precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def train(config: TrainConfig) -> str:
    return Trainer(config).train()
