"""`ove encode` end to end on generated videos and images with corrupt files mixed in: features against the
model run input by input, the output folder read back, kill-and-resume, settings refusal, bad arguments,
and two gloo ranks under torchrun."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from onevision_encoder import Encoder, OneVisionEncoderModel, load_features
from onevision_encoder.cli import main
from onevision_encoder.encode.inputs import Preprocessing
from onevision_encoder.processing import collate_patch_lists
from onevision_encoder.synthetic import write_image, write_video

TINY = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")
# Small but real: 8 frames, 320 of 2048 patches for videos; images give 1024 tokens, so batches mix lengths.
FRAMES, BUDGET = 8, 320
CLI_SETTINGS = ["--model", TINY, "--frames", str(FRAMES), "--budget", str(BUDGET), "--shard-size", "2"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """7 inputs in sorted order: 2 corrupt, 2 images, 3 videos (one in Matroska)."""
    root = tmp_path_factory.mktemp("media")
    (root / "a_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    (root / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    write_image(root / "c_image.png", width=96, height=64, seed=1)
    write_image(root / "d_image.jpg", width=64, height=80, seed=2)
    for i, name in enumerate(["e_video.mp4", "f_video.mkv", "g_video.mp4"]):
        write_video(root / name, num_frames=24, width=160, height=120, seed=i, scene=("objects", "pan")[i % 2])
    return root


@pytest.fixture(scope="module")
def in_memory(media):
    encoder = Encoder(TINY, frames=FRAMES, budget=BUDGET, tokens=True, batch_size=3, workers=1, progress=False)
    return encoder.encode([media])


@pytest.fixture(scope="module")
def reference_dir(media, tmp_path_factory):
    """An uninterrupted single-process CLI run (shards of 2 inputs)."""
    out = tmp_path_factory.mktemp("reference") / "features"
    assert main(["encode", str(media), "--out", str(out), "--workers", "1", "--tokens", *CLI_SETTINGS]) == 1
    return out


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "onevision_encoder.cli", "encode", *args], capture_output=True,
                          text=True, timeout=300, **kwargs)


def processes_with(environment_mark: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"OVE_TEST={environment_mark}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def test_features_equal_the_model_run_on_each_input_alone(media, in_memory):
    model = OneVisionEncoderModel.from_pretrained(TINY).eval()
    preprocessing = Preprocessing.with_defaults("codec", FRAMES, BUDGET)
    names = ["c_image.png", "d_image.jpg", "e_video.mp4", "f_video.mkv", "g_video.mp4"]
    assert in_memory.paths == [str(media / n) for n in names]
    assert [r["mode"] for r in in_memory.records] == ["image", "image", "codec", "codec", "codec"]
    assert [r["num_tokens"] for r in in_memory.records] == [1024, 1024, BUDGET, BUDGET, BUDGET]
    assert in_memory.pooled.shape == (5, model.config.hidden_size)
    for i, path in enumerate(in_memory.paths):
        with torch.no_grad():
            alone = model(**collate_patch_lists([preprocessing.load(path)]))
        torch.testing.assert_close(in_memory.pooled[i], alone.pooler_output[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(in_memory.tokens(i), alone.last_hidden_state[0], atol=1e-4, rtol=1e-4)
        assert in_memory.positions(i).shape == (in_memory.records[i]["num_tokens"], 3)


def test_corrupt_inputs_are_recorded_and_the_run_goes_on(media, in_memory):
    assert [f["path"] for f in in_memory.failures] == [str(media / "a_corrupt.mp4"), str(media / "b_corrupt.png")]
    assert all(f["error"] for f in in_memory.failures)


def test_output_folder_reads_back_as_the_in_memory_features(media, in_memory, reference_dir):
    on_disk = load_features(reference_dir)
    assert on_disk.paths == in_memory.paths
    torch.testing.assert_close(on_disk.pooled, in_memory.pooled, atol=1e-5, rtol=1e-5)
    for i in range(len(on_disk)):
        torch.testing.assert_close(on_disk.tokens(i), in_memory.tokens(i), atol=1e-4, rtol=1e-4)
        assert torch.equal(on_disk.positions(i), in_memory.positions(i))
    failures = [json.loads(line) for line in (reference_dir / "failures.jsonl").read_text().splitlines()]
    assert failures == in_memory.failures


def test_index_maps_each_input_to_its_shard_row_and_settings(media, reference_dir):
    index = [json.loads(line) for line in (reference_dir / "index.jsonl").read_text().splitlines()]
    assert [r["path"] for r in index] == [str(media / n) for n in
                                          ["c_image.png", "d_image.jpg", "e_video.mp4", "f_video.mkv", "g_video.mp4"]]
    # chunks of 2 inputs in input order: [a, b] [c, d] [e, f] [g]; the failed a and b take no rows
    assert [(r["shard"], r["row"]) for r in index] == [
        ("shards/shard-00001.safetensors", 0), ("shards/shard-00001.safetensors", 1),
        ("shards/shard-00002.safetensors", 0), ("shards/shard-00002.safetensors", 1),
        ("shards/shard-00003.safetensors", 0)]
    assert {(r["frames"], r["budget"]) for r in index if r["mode"] == "codec"} == {(FRAMES, BUDGET)}
    assert {(r["frames"], r["budget"], r["size"]) for r in index if r["mode"] == "image"} == {(None, None, 448)}
    assert {r["model"] for r in index} == {os.path.abspath(TINY)} and all(r["version"] for r in index)
    with safe_open(str(reference_dir / "shards/shard-00000.safetensors"), "pt") as shard:  # only failures
        assert list(shard.keys()) == []
        assert [e["path"] for e in json.loads(shard.metadata()["items"])] == [
            str(media / "a_corrupt.mp4"), str(media / "b_corrupt.png")]


# `ove` whose shard writer, once shard 0 is written, holds on until killed: the kill then always falls after
# the first shard and before the others, however fast the machine (a timed kill once came too late).
HELD_AFTER_FIRST_SHARD = """
import sys, time
import onevision_encoder.encode.encoder as encode
from onevision_encoder.cli import main
write = encode.write_shard
def write_then_hold(out, chunk_id, *args):
    write(out, chunk_id, *args)
    if chunk_id == 0:
        time.sleep(120)
encode.write_shard = write_then_hold
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_same_index(media, reference_dir, tmp_path):
    out = tmp_path / "features"
    first_shard = out / "shards" / "shard-00000.safetensors"
    mark = f"ove-test-{os.getpid()}-{time.monotonic_ns()}"  # finds the run's loader processes afterwards
    process = subprocess.Popen([sys.executable, "-c", HELD_AFTER_FIRST_SHARD, "encode", str(media), "--out", str(out),
                                "--workers", "1", "--tokens", *CLI_SETTINGS],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OVE_TEST": mark})
    deadline = time.monotonic() + 120
    while not first_shard.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    # A shard being written at the kill is only a temporary file, which the next run removes.
    written = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    assert list(written) == ["shard-00000.safetensors"]
    assert not (out / "index.jsonl").exists()
    deadline = time.monotonic() + 15
    while processes_with(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_with(mark), "loader processes outlived the killed run"

    resumed = run_cli(str(media), "--out", str(out), "--workers", "0", "--tokens", *CLI_SETTINGS)
    assert resumed.returncode == 1, resumed.stderr  # the corrupt inputs fail again
    assert all((out / "shards" / name).stat().st_mtime_ns == t for name, t in written.items()), "done shards redone"
    assert (out / "index.jsonl").read_bytes() == (reference_dir / "index.jsonl").read_bytes()
    assert (out / "failures.jsonl").read_bytes() == (reference_dir / "failures.jsonl").read_bytes()
    assert not [p for p in (out / "shards").iterdir() if ".tmp-" in p.name]
    torch.testing.assert_close(load_features(out).pooled, load_features(reference_dir).pooled)


def test_resuming_with_other_settings_is_refused(media, reference_dir, capsys):
    before = (reference_dir / "index.jsonl").read_bytes()
    settings = [a if a != str(FRAMES) else "4" for a in CLI_SETTINGS]
    assert main(["encode", str(media), "--out", str(reference_dir), "--workers", "0", "--tokens", *settings]) == 2
    assert "frames: 4 now, 8 in the folder" in capsys.readouterr().err
    assert (reference_dir / "index.jsonl").read_bytes() == before


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("args, message", [
    (["--mode", "dense"], "invalid choice: 'dense'"),
    (["--budget", "0"], "must be a positive integer"),
    (["--mode", "frames", "--budget", "300"], "budget only applies to mode 'codec'"),
    (["--frames", "2", "--budget", "600"], r"budget must be between 256 \(one whole frame\) and 512"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--workers", "-1"], "workers must be >= 0"),
    (["--model", "/no/such/model"], "model '/no/such/model': no such folder"),
])
def test_bad_arguments_are_one_clear_error(media, tmp_path, capsys, args, message):
    assert exit_code(["encode", str(media), "--out", str(tmp_path / "o"), "--model", TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and re.search(message, err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make_input, out, message", [
    (lambda d: d / "missing.mp4", "o", "missing.mp4: no such file or folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "o", "no video or image files"),
    (lambda d: d / "media", "file.txt/o", "Not a directory"),
])
def test_bad_inputs_and_unwritable_output_are_one_clear_error(media, tmp_path, capsys, make_input, out, message):
    os.symlink(media, tmp_path / "media")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    assert exit_code(["encode", str(make_input(tmp_path)), "--out", str(tmp_path / out), "--model", TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err, err


def test_two_ranks_under_torchrun_resume_and_give_the_single_process_index(media, reference_dir, tmp_path, torchrun):
    out = tmp_path / "features"
    # Start from a folder that a killed run left with one chunk done: the ranks share out the other three.
    (out / "shards").mkdir(parents=True)
    for name in ("settings.json", "shards/shard-00002.safetensors"):
        (out / name).write_bytes((reference_dir / name).read_bytes())
    done_before = (out / "shards/shard-00002.safetensors").stat().st_mtime_ns
    result = torchrun(2, "-m", "onevision_encoder.cli", "encode", str(media), "--out", str(out), "--workers", "0",
                      "--tokens", *CLI_SETTINGS)
    assert result.returncode == 1, result.stderr  # the corrupt inputs failed, nothing else
    assert "encoded 5 of 7 inputs" in result.stderr and result.stderr.count("encoded 5 of 7") == 1
    assert (out / "shards/shard-00002.safetensors").stat().st_mtime_ns == done_before
    writers = {}
    for shard in sorted((out / "shards").iterdir()):
        with safe_open(str(shard), "pt") as f:
            writers[shard.name] = f.metadata()["rank"]
    assert writers == {"shard-00000.safetensors": "0", "shard-00001.safetensors": "1",
                       "shard-00002.safetensors": "0", "shard-00003.safetensors": "0"}
    assert (out / "index.jsonl").read_bytes() == (reference_dir / "index.jsonl").read_bytes()
    assert (out / "failures.jsonl").read_bytes() == (reference_dir / "failures.jsonl").read_bytes()
    two, one = load_features(out), load_features(reference_dir)
    assert two.paths == one.paths and len(set(two.paths)) == len(two.paths)
    torch.testing.assert_close(two.pooled, one.pooled, atol=1e-5, rtol=1e-5)
    for i in range(len(one)):
        torch.testing.assert_close(two.tokens(i), one.tokens(i), atol=1e-4, rtol=1e-4)


def test_frames_mode_encodes_whole_uniform_frames_on_the_time_grid(media):
    encoder = Encoder(TINY, mode="frames", frames=4, tokens=True, workers=0, progress=False)
    features = encoder.encode([media / "e_video.mp4", media / "c_image.png"])
    assert [r["mode"] for r in features.records] == ["frames", "image"]
    assert features.records[0]["frames"] == 4 and features.records[0]["budget"] is None
    assert features.records[0]["num_tokens"] == 4 * 16 * 16
    assert features.positions(0)[:, 0].unique().tolist() == [0, 21, 42, 63]
