"""What a run reports: a progress bar (samples/s, time left), `log.jsonl`, TensorBoard when installed, and a
PNG of the loss curves at the end."""

from __future__ import annotations

import json
import os
import time

from ..encode.features import atomic_write

LOG = "log.jsonl"


class RunLog:
    """Rank 0's record of a run. `truncate(step)` drops the lines after a checkpoint's step when a run resumes,
    so that the log of an interrupted run ends up like an uninterrupted one's."""

    def __init__(self, out: str, total_steps: int, start_step: int, show_progress: bool, samples_per_step: int):
        self.path = os.path.join(out, LOG)
        self.samples_per_step = samples_per_step
        self._bar = None
        if show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._writer = _tensorboard(out)
        self._since, self._steps = time.perf_counter(), 0

    def truncate(self, step: int) -> None:
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(self.path, "".join(kept).encode())

    def step_done(self) -> None:
        self._steps += 1
        if self._bar is not None:
            self._bar.update(1)

    def write(self, record: dict) -> None:
        """One line: step (steps done), lr, loss (weighted sum), loss per head, grad norm, samples/s."""
        elapsed = time.perf_counter() - self._since
        rate = self._steps * self.samples_per_step / elapsed if elapsed > 0 else 0.0
        record = {**record, "samples_per_s": round(rate, 2)}
        self._since, self._steps = time.perf_counter(), 0
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}", samples_s=f"{rate:.1f}")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def read_log(out: str) -> list[dict]:
    path = os.path.join(out, LOG)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(out: str) -> str | None:
    """`loss.png`: the total and per-head losses, the learning rate and the gradient norm by step."""
    from ..plotting import plot_curves

    records = read_log(out)
    if not records:
        return None
    steps = [r["step"] for r in records]
    heads = sorted({k for r in records for k in r if k.startswith("loss/")})
    panels = {
        "loss": {"total": (steps, [r["loss"] for r in records]),
                 **{k[len("loss/"):]: (steps, [r[k] for r in records]) for k in heads}},
        "learning rate": {"lr": (steps, [r["lr"] for r in records])},
        "gradient norm": {"backbone": (steps, [r["grad_norm"] for r in records])},
    }
    return plot_curves(os.path.join(out, "loss.png"), panels, xlabel="step", title="ove train")
