"""Checkpoints that resume a run exactly, written so that none is ever seen half-written.

A run's folder:

    OUT/run.json                         the run's identity: its id and the settings that define it
    OUT/checkpoints/step-00001000/       one complete checkpoint
        model.safetensors                backbone weights, float32
        optimizer.safetensors            the backbone's AdamW moments (the same on every rank)
        rank-00000.safetensors           per rank: its centre shards and their AdamW moments, its RNG states
                                         (python, numpy, torch, CUDA) and its data streams' positions
        state.json                       step, world size, run id, loss-scaler state; written last

Every file is safetensors or JSON (no pickles). All ranks write into `step-XXXXXXXX.partial/`; once every
rank is done, rank 0 writes `state.json` and renames the folder to its final name, so a folder without the
suffix is complete. Only the last `keep_last` are kept. The folder must be one that every rank sees (a
shared file system on several machines).

Resuming on another number of ranks joins the old centre shards (and their moments) and cuts them again
for the new ranks; RNG states and data positions are per rank, so there a rank without an old counterpart
starts its own from the seed, and the data order of the epoch in progress is approximate (documented).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..encode.features import atomic_write
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
PARTIAL = ".partial"
# settings that may change between the runs of one training (they do not change what is trained)
NOT_IDENTITY = {("run", "out"), ("run", "log_every"), ("run", "save_every"), ("run", "keep_last"), ("run", "progress")}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed: another run's, or damaged."""


def identity(config: TrainConfig) -> dict:
    data = config.to_dict()
    for section, key in NOT_IDENTITY:
        data[section].pop(key, None)
    data.pop("strategy")  # full state dicts: a DDP run resumes under FSDP and back
    for head in data["heads"]:
        head.pop("workers", None)
    return data


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def open_run(out: str, config: TrainConfig, is_main: bool) -> str:
    """The run's id: a new one for a new folder, the folder's own if it holds this run. A folder of another
    run (other settings) or a folder with checkpoints but no run.json is a CheckpointError naming the
    differences."""
    path = os.path.join(out, "run.json")
    mine = identity(config)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        theirs, now = _flatten(recorded.get("identity", {})), _flatten(mine)
        differences = [f"{k}: {now.get(k)!r} now, {theirs.get(k)!r} in the folder"
                       for k in sorted(set(theirs) | set(now)) if theirs.get(k) != now.get(k)]
        if differences:
            raise CheckpointError(f"{out} holds checkpoints of another run ({'; '.join(differences[:5])}"
                                  f"{'; ...' if len(differences) > 5 else ''}); give another run.out to start a "
                                  "new run")
        return recorded["run_id"]
    if os.path.isdir(os.path.join(out, CHECKPOINTS)) and os.listdir(os.path.join(out, CHECKPOINTS)):
        raise CheckpointError(f"{out}/{CHECKPOINTS} exists without {path}: not a folder of `ove train`")
    run_id = uuid.uuid4().hex
    if is_main:
        os.makedirs(out, exist_ok=True)
        _write_json(path, {"run_id": run_id, "identity": mine})
    return run_id


def _write_json(path: str, data) -> None:
    atomic_write(path, json.dumps(data, indent=1).encode())


def _save_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Atomically: a temporary name, then a rename."""
    tmp = f"{path}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
              metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def _load_tensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    return load_file(path), metadata


# ---------------------------------------------------------------------------------------------------
# Optimiser and RNG states as tensors + JSON
# ---------------------------------------------------------------------------------------------------


def optimizer_tensors(state_dict: dict, prefix: str) -> tuple[dict, dict]:
    """An optimiser state dict (parameters keyed by index or by name) as tensors `PREFIX.PARAM.KEY` plus JSON."""
    tensors = {f"{prefix}.{param}.{key}": value for param, entry in state_dict["state"].items()
               for key, value in entry.items() if isinstance(value, torch.Tensor)}
    scalars = [[param, key, value] for param, entry in state_dict["state"].items()
               for key, value in entry.items() if not isinstance(value, torch.Tensor)]
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict, meta: dict, prefix: str) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            param, key = name[len(prefix) + 1:].rsplit(".", 1)  # a parameter name has dots, a state key none
            state.setdefault(int(param) if param.isdigit() else param, {})[key] = value
    for param, key, value in meta["scalars"]:
        state.setdefault(param, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states(device: torch.device) -> tuple[dict, dict]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(keys.astype(np.int64))}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    version, internal, python_gauss = random.getstate()
    meta = {"python": [version, list(internal), python_gauss], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict, device: torch.device) -> None:
    version, internal, python_gauss = meta["python"]
    random.setstate((version, tuple(internal), python_gauss))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


# ---------------------------------------------------------------------------------------------------
# Writing and finding checkpoints
# ---------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(out: str) -> list[str]:
    """Complete checkpoint folders, oldest first."""
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and not n.endswith(PARTIAL)
                   and os.path.isfile(os.path.join(root, n, "state.json")))
    return [os.path.join(root, n) for n in names]


def remove_partial(out: str) -> None:
    """What a run killed while writing a checkpoint left behind."""
    root = os.path.join(out, CHECKPOINTS)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.endswith(PARTIAL):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class CheckpointWriter:
    """Writes one checkpoint across ranks: `begin` (rank 0 makes the folder), every rank's `write_rank`,
    then `finish` on rank 0 after a barrier."""

    def __init__(self, out: str, run_id: str, rank: int, world_size: int, keep_last: int):
        self.out, self.run_id, self.rank, self.world_size, self.keep_last = out, run_id, rank, world_size, keep_last

    def partial_folder(self, step: int) -> str:
        return os.path.join(self.out, CHECKPOINTS, checkpoint_name(step) + PARTIAL)

    def begin(self, step: int) -> None:
        if self.rank == 0:
            folder = self.partial_folder(step)
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)

    def write_shared(self, step: int, model_state: dict, optimizer_state_dict: dict) -> None:
        folder = self.partial_folder(step)
        _save_tensors(os.path.join(folder, "model.safetensors"), {k: v.float() for k, v in model_state.items()})
        tensors, meta = optimizer_tensors(optimizer_state_dict, "backbone")
        _save_tensors(os.path.join(folder, "optimizer.safetensors"), tensors, meta)

    def write_rank(self, step: int, tensors: dict, metadata: dict) -> None:
        _save_tensors(os.path.join(self.partial_folder(step), f"rank-{self.rank:05d}.safetensors"), tensors, metadata)

    def finish(self, step: int, state: dict) -> str:
        folder = self.partial_folder(step)
        _write_json(os.path.join(folder, "state.json"),
                    {**state, "step": step, "world_size": self.world_size, "run_id": self.run_id})
        final = os.path.join(self.out, CHECKPOINTS, checkpoint_name(step))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(folder, final)
        for old in complete_checkpoints(self.out)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final


class Checkpoint:
    """A complete checkpoint folder, read back."""

    def __init__(self, folder: str, run_id: str):
        self.folder = folder
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            self.state = json.load(f)
        if self.state.get("run_id") != run_id:
            raise CheckpointError(f"{folder} belongs to run {self.state.get('run_id')}, not to this folder's run "
                                  f"{run_id}")
        self.step, self.world_size = self.state["step"], self.state["world_size"]

    def model_state(self) -> dict:
        return load_file(os.path.join(self.folder, "model.safetensors"))

    def backbone_optimizer(self) -> dict:
        tensors, meta = _load_tensors(os.path.join(self.folder, "optimizer.safetensors"))
        return optimizer_state(tensors, meta, "backbone")

    def rank_file(self, rank: int) -> tuple[dict, dict] | None:
        path = os.path.join(self.folder, f"rank-{rank:05d}.safetensors")
        if not os.path.isfile(path):
            return None
        return _load_tensors(path)

    def all_ranks(self) -> list[tuple[dict, dict]]:
        files = [self.rank_file(r) for r in range(self.world_size)]
        missing = [r for r, f in enumerate(files) if f is None]
        if missing:
            raise CheckpointError(f"{self.folder}: the files of ranks {missing} are missing")
        return files
