"""Shared test fixtures: tiny random transformers vision models, made locally with transformers' own config
classes (no network), each with a preprocessor config so that its inputs stay small; the published selection
of the shared real clip; `torch_threads`; and `torchrun`, which runs a command on several ranks and never
leaves one behind."""

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest

TINY_WIDTH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


def _save(model, folder, size, mean, std):
    model.save_pretrained(folder)
    with open(folder / "preprocessor_config.json", "w") as f:
        json.dump({"do_resize": True, "size": {"height": size, "width": size}, "image_mean": mean,
                   "image_std": std}, f)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory):
    """A SigLIP vision model: 32 px, 8 px patches (16 tokens a frame), SigLIP's 0.5/0.5 normalisation."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **TINY_WIDTH))
    return _save(model, tmp_path_factory.mktemp("siglip"), 32, [0.5] * 3, [0.5] * 3)


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory):
    """A DINOv2 model with 2 register tokens: 32 px, 8 px patches, ImageNet normalisation."""
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(image_size=32, patch_size=8, num_register_tokens=2,
                                                               **TINY_WIDTH))
    return _save(model, tmp_path_factory.mktemp("dinov2"), 32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _torchrun(nproc: int, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node N ARGS` (a free port of its own), one
    thread a rank. On a timeout torchrun is asked to stop (SIGTERM), which stops its ranks first: each rank
    runs in a session of its own, so killing torchrun outright (what `subprocess.run` does) left a hung rank
    running after the test had failed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            try:
                err = process.communicate(timeout=60)[1]
            except subprocess.TimeoutExpired:
                process.kill()
                err = "(torchrun did not stop its ranks within 60 s of SIGTERM; killed)"
            pytest.fail(f"{' '.join(args[:3])} on {nproc} ranks did not finish in {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture(scope="session")
def torchrun():
    """torchrun(nproc, *args, timeout=300, env=None) -> CompletedProcess (see `_torchrun`)."""
    return _torchrun


@pytest.fixture(scope="session")
def published_selection() -> str:
    """`shared/reference-selection`: the shared real clip and the published pipeline's selection on it. shared/
    sits beside the repository (CI, the main checkout); OVE_SHARED names it from elsewhere (a worktree).
    Skips the test without it."""
    shared = os.environ.get("OVE_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
    folder = os.path.join(shared, "reference-selection")
    if not os.path.isdir(folder):
        pytest.skip(f"no published selection at {folder} (the shared/ folder beside the repository, or $OVE_SHARED)")
    return folder


@contextmanager
def _torch_threads(n: int):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def torch_threads():
    """`with torch_threads(n):` torch on n threads inside, as it was after."""
    return _torch_threads
