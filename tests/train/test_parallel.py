"""DDP wrappers let go of the process group before it is destroyed: `Backbone.unwrap` (training) and the
probe trainer's `unwrap` free the DistributedDataParallel object, and with it its reducer, which holds the
group (`encode.encoder.Ranks.close` says why that order matters: the other one can deadlock at exit).

Run as a script (`test_parallel.py OUT_DIR RANK`) this file is one rank of the two-rank test."""

from __future__ import annotations

import json
import os
import sys
import weakref
from types import SimpleNamespace

import torch


def _ddp_freed(owner, attribute: str) -> bool:
    """One DDP step through `owner.<attribute>`, then `owner.unwrap()`: whether the DDP object is gone."""
    wrapped = getattr(owner, attribute)
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    gone = weakref.ref(wrapped)
    del wrapped
    owner.unwrap()
    return gone() is None


def worker(out_dir: str, rank: int) -> None:
    import torch.distributed as dist

    from onevision_encoder.probe.run import ProbeSettings, _Trainer
    from onevision_encoder.train.parallel import Backbone

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=2)
    cpu = torch.device("cpu")
    backbone = Backbone(torch.nn.Linear(4, 3), "ddp", 2, cpu)
    backbone.module(torch.randn(2, 4)).sum().backward()
    freed = {"train": _ddp_freed(backbone, "module"), "train_module_is_model": backbone.module is backbone.model}

    settings = ProbeSettings(model="m", train="t", val="v", out=out_dir, epochs=1, batch_size=2)
    ranks = SimpleNamespace(rank=rank, world_size=2)
    trainer = _Trainer(SimpleNamespace(hidden_size=8, ordinal_time=False), 3, settings, ranks, cpu, torch.float32,
                       None, [0, 1])
    trainer.model(torch.randn(1, 2, 8), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)).sum().backward()
    freed["probe"] = _ddp_freed(trainer, "model")
    freed["probe_model_is_head"] = trainer.model is trainer.head
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(freed, f)
    dist.barrier()
    dist.destroy_process_group()


def test_unwrap_frees_ddp_before_the_process_group_goes(tmp_path, run_two_ranks):
    run_two_ranks(__file__, tmp_path, timeout=180)
    for rank in range(2):
        freed = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert freed == {"train": True, "train_module_is_model": True, "probe": True, "probe_model_is_head": True}


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(150)  # where a stuck rank waits, in the test's failure message
    worker(sys.argv[1], int(sys.argv[2]))
