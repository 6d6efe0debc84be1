"""`ove probe` end to end on generated datasets: the report recounted from its predictions, the same numbers
run after run and with or without the cache, corrupt clips recorded, other encoders, refusals, and two gloo
ranks giving the report of one."""

import json
import os

import pytest

from onevision_encoder.cli import main
from onevision_encoder.probe import ProbeSettings, metrics, run_probe
from onevision_encoder.synthetic import write_probe_dataset

TINY = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")
RUN = dict(epochs=3, batch_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Motion direction, 4 classes: 3 training and 2 validation clips a class, 16 frames of 64x48."""
    return write_probe_dataset(tmp_path_factory.mktemp("motion"), "motion_direction", 4, 3, 2, num_frames=16,
                               width=64, height=48)


@pytest.fixture(scope="module")
def cached_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cached") / "run"
    return out, run_probe(ProbeSettings(TINY, *dataset, out=str(out), **RUN))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_report_files_and_names_and_metrics_recount_from_predictions(cached_run):
    out, report = cached_run
    assert sorted(os.listdir(out)) == ["cache", "confusion.png", "curves.png", "head.safetensors", "predictions.jsonl",
                                       "report.json"]
    with open(out / "report.json") as f:
        written = json.load(f)
    assert written["final"] == report["final"] and written["num_classes"] == 4 and written["classes"] == list("0123")
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == written["val_clips"] == written["evaluated"] == 8
    assert all(set(p) >= {"path", "label", "top5"} and len(p["top5"]) == 4 for p in predictions)
    assert metrics(predictions) == written["final"]  # recomputable from predictions.jsonl alone
    assert [e["epoch"] for e in written["epochs"]] == [1, 2, 3]
    assert written["final"] == {k: written["epochs"][-1][k] for k in ("top1", "top5", "mean_class_accuracy")}
    assert "epoch" in written["best_epoch_selected_on_validation"]
    assert written["cache"]["clips"] == 20 and written["cache"]["mean_tokens_per_clip"] == 8 * 256
    assert written["cache"]["token_bytes"] == 20 * 8 * 256 * 128 * 4  # float32 on CPU


def test_same_seed_same_numbers_with_and_without_cache(cached_run, dataset, tmp_path):
    out, report = cached_run
    again = run_probe(ProbeSettings(TINY, *dataset, out=str(tmp_path / "again"), cache_dir=str(out / "cache"), **RUN))
    assert _without_times(again["epochs"]) == _without_times(report["epochs"])
    live = run_probe(ProbeSettings(TINY, *dataset, out=str(tmp_path / "live"), cache=False, **RUN))
    assert live["cache"] is None
    for a, b in zip(live["epochs"], report["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert [p["top5"] for p in read_jsonl(tmp_path / "live" / "predictions.jsonl")] == \
        [p["top5"] for p in read_jsonl(out / "predictions.jsonl")]


def _without_times(epochs):
    return [{k: v for k, v in e.items() if not k.endswith("_seconds")} for e in epochs]


def test_corrupt_clip_is_recorded_counted_and_skipped(dataset, tmp_path):
    train, val = dataset
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    with open(train) as f:
        lines = f.read()
    folder = os.path.dirname(train)
    (tmp_path / "train.csv").write_text("".join(f"{os.path.join(folder, line)}\n" for line in lines.split()) +
                                        f"{bad},1\n")
    report = run_probe(ProbeSettings(TINY, str(tmp_path / "train.csv"), val, out=str(tmp_path / "run"),
                                     **{**RUN, "epochs": 1}))
    assert report["num_failed"] == 1 and report["failures"][0]["path"] == str(bad)
    assert report["failures"][0]["split"] == "train" and report["evaluated"] == 8


def test_refusals_are_one_clear_error(cached_run, dataset, tmp_path, capsys, tiny_siglip):
    out, _ = cached_run
    train, val = dataset
    assert main(["probe", "--model", TINY, "--train", train, "--val", val, "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert main(["probe", "--model", tiny_siglip, "--train", train, "--val", val, "--out", str(tmp_path / "s"),
                 "--mode", "codec"]) == 2
    assert "codec mode needs a model that takes patch lists" in capsys.readouterr().err
    assert main(["probe", "--model", TINY, "--train", train, "--val", val, "--out", str(tmp_path / "a"),
                 "--augment", "--cache"]) == 2
    assert "cannot be used with --augment" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["tiny_siglip", "tiny_dinov2"])
def test_other_encoders_probe_their_frame_tokens(which, dataset, tmp_path, request):
    model = request.getfixturevalue(which)
    report = run_probe(ProbeSettings(model, *dataset, out=str(tmp_path / "run"), **{**RUN, "epochs": 1}))
    assert report["model"] == os.path.abspath(model) and report["evaluated"] == 8
    assert report["cache"]["mean_tokens_per_clip"] == 8 * 16  # 8 frames of 4x4 patches, DINO's extras dropped


def test_two_gloo_ranks_give_the_report_of_one(cached_run, dataset, tmp_path, torchrun):
    _, single = cached_run
    train, val = dataset
    out = tmp_path / "ddp"
    done = torchrun(2, "-m", "onevision_encoder.cli", "probe", "--model", TINY, "--train", train, "--val", val,
                    "--out", str(out), "--epochs", "3", "--batch-size", "4", "--workers", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["world_size"] == 2 and report["evaluated"] == 8
    assert report["final"] == single["final"]
    for a, b in zip(report["epochs"], single["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert {k: a[k] for k in ("top1", "top5")} == {k: b[k] for k in ("top1", "top5")}
    assert [p["path"] for p in read_jsonl(out / "predictions.jsonl")] == \
        [p["path"] for p in read_jsonl(cached_run[0] / "predictions.jsonl")]
