"""`ove train` as a user runs it: killed and resumed, on two gloo ranks, resumed on another number of ranks,
refusing another run's folder, never leaving a half-written checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from onevision_encoder.cli import main
from onevision_encoder.train.checkpoint import CheckpointError, complete_checkpoints
from onevision_encoder.train.config import load_config
from onevision_encoder.train.logging import read_log
from onevision_encoder.train.loop import Trainer

TINY_P14 = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")


def _finish(process, timeout=300):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # leave nothing running
        raise
    return process.returncode, err


def _kill_after(process, out, steps: int, timeout=120) -> None:
    """SIGKILL the run once its log shows `steps` steps (it may have run a little further by then)."""
    log, deadline = os.path.join(out, "log.jsonl"), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isfile(log) and len(read_log(out)) >= steps:
            break
        if process.poll() is not None:
            pytest.fail(f"the run ended before step {steps}: {process.communicate()[1][-2000:]}")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_run_resumes_with_the_same_losses_bit_for_bit(tmp_path, tiny_config, write_config, ove_train):
    steps = 12
    whole = write_config(tmp_path / "whole.json", tiny_config(tmp_path / "whole", steps=steps))
    cut = write_config(tmp_path / "cut.json", tiny_config(tmp_path / "cut", steps=steps))
    uninterrupted = ove_train(whole)
    interrupted = ove_train(cut)
    _kill_after(interrupted, tmp_path / "cut", steps=6)  # checkpoints every 4 steps: resumes from step 4 (or 8)
    assert _finish(uninterrupted)[0] == 0
    assert len(read_log(tmp_path / "cut")) < steps
    code, err = _finish(ove_train(cut))
    assert code == 0, err
    assert "resumed from" in err

    expected, got = read_log(tmp_path / "whole"), read_log(tmp_path / "cut")
    keys = ["step", "lr", "loss", "loss/images", "loss/videos", "grad_norm"]
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in expected]
    with open(tmp_path / "whole" / "final" / "model.safetensors", "rb") as a, \
            open(tmp_path / "cut" / "final" / "model.safetensors", "rb") as b:
        assert a.read() == b.read()
    assert os.path.isfile(tmp_path / "cut" / "loss.png")


def test_two_gloo_ranks_train_like_one_with_ddp_or_fsdp_and_resume_on_one(tmp_path, tiny_config, write_config, ove_train):
    # Partial FC at rate 1 and all labels drawn: nothing random, so 1 rank with the global batch and 2 ranks
    # with half each take the same steps (up to float summation order), with both heads (the image head's
    # backward kept local, the video head's summing both) and all three video forms.
    def config(out):
        c = tiny_config(out, steps=8, keep_last=5)
        for head in c["heads"]:
            head.update(sample_rate=1.0, labels_per_step=4)
        return write_config(tmp_path / f"{os.path.basename(out)}.json", c)

    one = ove_train(config(tmp_path / "one"))
    code, err = _finish(ove_train(config(tmp_path / "two"), nproc=2))
    assert code == 0, err
    code, err = _finish(ove_train(config(tmp_path / "sharded"), "--set", "strategy=fsdp", nproc=2))
    assert code == 0, err
    assert _finish(one)[0] == 0
    losses = lambda out: torch.tensor([r["loss"] for r in read_log(out)], dtype=torch.float64)  # noqa: E731
    assert len(losses(tmp_path / "two")) == 8
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(losses(tmp_path / "sharded"), losses(tmp_path / "one"), rtol=1e-4, atol=1e-4)

    # The 2-rank run's step-4 checkpoint, resumed on one rank: the two centre shards join again.
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    shutil.copy(tmp_path / "two" / "run.json", resumed)
    shutil.copy(tmp_path / "two" / "log.jsonl", resumed)
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    with open(resumed / "checkpoints" / "step-00000004" / "state.json") as f:
        assert json.load(f)["world_size"] == 2
    code, err = _finish(ove_train(config(resumed)))
    assert code == 0, err
    assert "resumed from" in err and "2 ranks" in err
    torch.testing.assert_close(losses(resumed), losses(tmp_path / "one"), rtol=1e-4, atol=1e-4)


def test_another_runs_folder_is_refused(tmp_path, tiny_config, write_config, one_thread, capsys):
    first = write_config(tmp_path / "a.json", tiny_config(tmp_path / "run", steps=2, videos=False))
    assert main(["train", first]) == 0
    capsys.readouterr()
    assert main(["train", first, "--set", "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "optim.lr" in err and err.count("error:") == 1
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]  # nothing of the first run lost


def test_an_interrupted_checkpoint_is_never_taken_for_one(tmp_path, tiny_config, write_config, one_thread,
                                                          monkeypatch):
    config = load_config(write_config(tmp_path / "c.json", tiny_config(tmp_path / "run", steps=4, videos=False,
                                                                       save_every=1)))
    trainer = Trainer(config)
    trainer.train_step()
    trainer.save()
    trainer.train_step()

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trainer.writer, "write_rank", dies)
    with pytest.raises(OSError):
        trainer.save()  # dies half-way through step 2's checkpoint
    assert [os.path.basename(c) for c in complete_checkpoints(tmp_path / "run")] == ["step-00000001"]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step-00000002.partial")

    again = Trainer(config)  # resumes from the complete one and clears the rest
    assert again.step == 1
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "step-00000002.partial")

    # the checkpoint of another run's folder, copied in, is refused by its run id
    other = load_config(write_config(tmp_path / "o.json", tiny_config(tmp_path / "other", steps=4, videos=False,
                                                                      save_every=1)))
    Trainer(other).save()
    shutil.copytree(tmp_path / "other" / "checkpoints" / "step-00000000",
                    tmp_path / "run" / "checkpoints" / "step-00000009")
    with pytest.raises(CheckpointError, match="belongs to run"):
        Trainer(config)


def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(tmp_path, tiny_config,
                                                                                 write_config):
    grads, calls = {}, {}
    for enabled in (False, True):
        c = tiny_config(tmp_path / f"run-{enabled}", steps=2, videos=False)
        c["model"]["gradient_checkpointing"] = enabled
        trainer = Trainer(load_config(write_config(tmp_path / f"{enabled}.json", c)))
        mlp = trainer.backbone.encoder.layers[0].mlp  # inside the checkpointed layer: runs again if recomputed
        count, forward = [0], mlp.forward

        def counted(x):  # (module hooks are not run again in a recomputation: count the calls themselves)
            count[0] += 1
            return forward(x)

        mlp.forward = counted
        trainer.optimizer.step = trainer.centre_optimizer.step = lambda *a, **k: None  # keep the gradients
        trainer.optimizer.zero_grad = trainer.centre_optimizer.zero_grad = lambda *a, **k: None
        trainer.train_step()
        calls[enabled] = count[0]
        grads[enabled] = torch.cat([p.grad.flatten() for p in trainer.backbone.parameters()])
    assert calls == {False: 1, True: 2}  # the forward again during the backward
    torch.testing.assert_close(grads[True], grads[False])


def test_training_continues_a_published_checkpoint_in_float32(tmp_path, tiny_config, write_config, one_thread):
    # the published checkpoint's layout, stored in bfloat16 as the hub's is: the optimiser still gets float32
    from transformers import AutoModel

    published = AutoModel.from_pretrained(TINY_P14, dtype=torch.bfloat16)
    published.save_pretrained(tmp_path / "published")
    c = tiny_config(tmp_path / "run", steps=1, videos=False)
    c["model"] = {"init": str(tmp_path / "published")}
    c["stages"] = [{"steps": 1, "image_size": 28}]
    trainer = Trainer(load_config(write_config(tmp_path / "c.json", c)))
    weights = dict(trainer.backbone.named_parameters())
    assert all(p.dtype == torch.float32 for p in weights.values())
    for name, value in published.named_parameters():
        assert torch.equal(weights[name].detach(), value.detach().float()), name
    before = weights["encoder.layers.0.mlp.fc1.weight"].detach().clone()
    trainer.train_step()
    after = weights["encoder.layers.0.mlp.fc1.weight"].detach()
    assert 0 < (after - before).abs().max() <= 1e-3 * 1.01  # a first AdamW step moves a weight by lr at most
    assert not torch.equal(after, after.bfloat16().float())  # kept in float32: bf16 weights would round it away


def test_bf16_autocast_computes_in_bf16_and_keeps_float32_weights(tmp_path, tiny_config, write_config, one_thread):
    losses = {}
    for precision in ("fp32", "bf16"):
        c = tiny_config(tmp_path / precision, steps=2, videos=False)
        c["precision"] = precision
        trainer = Trainer(load_config(write_config(tmp_path / f"{precision}.json", c)))
        losses[precision] = [trainer.train_step()["loss"] for _ in range(2)]
        assert all(p.dtype == torch.float32 for p in trainer.backbone.parameters())
    assert losses["bf16"] != losses["fp32"]  # autocast really ran the model in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
