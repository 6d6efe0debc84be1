"""Small generated training data for the `ove train` tests: images and videos with labels, and a config of a
tiny model (hidden 64, one layer, 8 px patches, 32 px images) that trains on them in well under a second
a step on a 2-core CPU."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from onevision_encoder.synthetic import write_image, write_video

NUM_IMAGES, NUM_VIDEOS, IMAGE_CLASSES, VIDEO_CLASSES = 16, 4, 16, 8
TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "patch_size": 8}


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    os.makedirs(root / "images")
    os.makedirs(root / "videos")
    for i in range(NUM_IMAGES):
        write_image(root / "images" / f"{i:02d}.png", width=48, height=40, seed=i)
    for i in range(NUM_VIDEOS):
        write_video(root / "videos" / f"{i}.mp4", num_frames=24, width=64, height=48, seed=i,
                    scene=("objects", "pan")[i % 2])
    rng = np.random.default_rng(0)
    np.save(root / "image_labels.npy", rng.integers(0, IMAGE_CLASSES, (NUM_IMAGES, 4)))
    np.save(root / "video_labels.npy", rng.integers(0, VIDEO_CLASSES, (NUM_VIDEOS, 4)))
    return root


def _tiny_config(root, out, steps=8, videos=True, **run) -> dict:
    """A run of `steps` steps on `training_data`: an image head (and a video head of all three forms)."""
    heads = [{"name": "images", "inputs": [str(root / "images")], "labels": str(root / "image_labels.npy"),
              "num_classes": IMAGE_CLASSES, "batch_size": 8, "labels_per_step": 2, "sample_rate": 0.5}]
    if videos:
        heads.append({"name": "videos", "inputs": [str(root / "videos")], "labels": str(root / "video_labels.npy"),
                      "num_classes": VIDEO_CLASSES, "batch_size": 4, "labels_per_step": 2, "frames": 16,
                      "budget": 64, "clip_frames": 4, "video_size": 32})
    return {"run": {"out": str(out), "steps": steps, "log_every": 1, "save_every": 4, "progress": False, **run},
            "model": {"config": TINY_MODEL}, "optim": {"lr": 1e-3, "warmup_steps": 2},
            "stages": [{"steps": steps // 2, "image_size": 32}, {"steps": steps - steps // 2, "image_size": 48}],
            "heads": heads}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Ranks:
    """The processes of one multi-rank run, waited on together (killed together if one hangs)."""

    def __init__(self, processes):
        self.processes, self.returncode = processes, None
        self.printed: list[str] = []  # per process, stdout then stderr, once they have ended

    def kill(self):
        for p in self.processes:
            p.kill()

    def communicate(self, timeout=None):
        try:
            outputs = [p.communicate(timeout=timeout) for p in self.processes]
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.returncode = next((p.returncode for p in self.processes if p.returncode), 0)
        self.printed = [(out or "") + (err or "") for out, err in outputs]
        return outputs[0][0], "".join(err or "" for _, err in outputs)


def _run_two_ranks(script: str, out_dir, timeout: float) -> None:
    """Run `python SCRIPT OUT_DIR RANK` for ranks 0 and 1 (one thread each) and wait for both; the test fails,
    with what they printed, if one hangs (both are killed) or exits with an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = _Ranks([subprocess.Popen([sys.executable, script, str(out_dir), str(rank)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for rank in range(2)])
    try:
        ranks.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # both killed
        printed = [p.communicate()[0] for p in ranks.processes]
        pytest.fail(f"the two ranks did not finish in {timeout} s:\n" + "\n".join(printed))
    assert ranks.returncode == 0, ranks.printed


@pytest.fixture(scope="session")
def run_two_ranks():
    """run_two_ranks(script, out_dir, timeout): the script's two gloo ranks, run to the end (`_run_two_ranks`)."""
    return _run_two_ranks


def _ove_train(*args, nproc: int = 1):
    """`ove train ARGS` in fresh processes (one thread each, as CI), one per rank with the environment torchrun
    gives (torchrun's own rendezvous is left out: on a busy machine it once hung another test)."""
    command = [sys.executable, "-m", "onevision_encoder.cli", "train", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = _free_port()
    ranks = [{**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for r in range(nproc)]
    return _Ranks([subprocess.Popen(command, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for e in ranks])


@pytest.fixture
def tiny_config(training_data):
    """config(out, steps=8, videos=True, **run keys) -> a config dict for the generated data."""
    return lambda out, **kw: _tiny_config(training_data, out, **kw)


@pytest.fixture
def one_thread(torch_threads):
    """Tiny models gain nothing from threads, and a busy machine makes OpenMP's spinning threads very slow."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def ove_train():
    """ove_train(*args, nproc=1) -> the Popen of `ove train ARGS` (for nproc > 1, its ranks together)."""
    return _ove_train


@pytest.fixture(scope="session")
def write_config():
    def write(path, config: dict) -> str:
        with open(path, "w") as f:
            json.dump(config, f)
        return str(path)

    return write
