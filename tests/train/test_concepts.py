"""`ove concepts build` / `assign`: banks and labels from encode folders, .npy and .safetensors features, in
formats other tools read; bad input is one clear error and writes nothing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from onevision_encoder import Encoder, load_features
from onevision_encoder.cli import main
from onevision_encoder.train.concepts import (FeatureFileError, assign_concepts, build_bank, load_bank,
                                              read_features, read_labels)
from onevision_encoder.train.kmeans import faiss_available

TINY = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")


def features_matrix(num_rows=600, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(16, dim, generator=g), dim=1)
    rows = centres[torch.randint(0, 16, (num_rows,), generator=g)] + 0.15 * torch.randn(num_rows, dim, generator=g)
    return rows * 3.0  # not unit rows: the commands normalise


def brute_force_labels(rows, centres, k):
    return (F.normalize(rows.double(), dim=1) @ centres.double().T).argsort(dim=1, descending=True)[:, :k]


@pytest.fixture(scope="module")
def encode_folder(tmp_path_factory):
    """A real `ove encode` folder: five generated pictures through the tiny checkpoint, one corrupt file."""
    root = tmp_path_factory.mktemp("encoded")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = root / f"picture{i}.png"
        Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 80, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (root / "broken.png").write_bytes(b"not a picture")
    paths.insert(2, str(root / "broken.png"))
    out = root / "features"
    Encoder(TINY, mode="image", workers=0, progress=False, shard_size=2).encode(paths, out=str(out))
    return out


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_build_and_assign_from_npy_and_safetensors(tmp_path, capsys):
    rows = features_matrix()
    np.save(tmp_path / "a.npy", rows[:400].numpy().astype(np.float16))
    save_file({"features": rows[400:], "ids": torch.arange(200)}, str(tmp_path / "b.safetensors"))
    bank = tmp_path / "bank.safetensors"
    code, err = run(["concepts", "build", str(tmp_path / "a.npy"), str(tmp_path / "b.safetensors"),
                     "--num-concepts", "16", "--out", str(bank), "--iterations", "8", "--seed", "5",
                     "--max-points-per-centre", "30"], capsys)
    assert code == 0, err
    assert "16 concepts of 24 dims from 480 of 600 rows" in err
    with safe_open(str(bank), "pt") as f:  # readable without this package
        centres, metadata = f.get_tensor("centres"), f.metadata()
    assert centres.dtype == torch.float32 and centres.shape == (16, 24)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(16))
    assert json.loads(metadata["num_concepts"]) == 16 and json.loads(metadata["seed"]) == 5
    assert json.loads(metadata["num_train_points"]) == 480 and json.loads(metadata["iterations"]) == 8
    assert json.loads(metadata["sources"]) == [str(tmp_path / "a.npy"), str(tmp_path / "b.safetensors")]
    assert metadata["backend"] == ("faiss" if faiss_available() else "torch")  # "auto": faiss when installed

    for name in ("labels.npy", "labels.safetensors"):
        code, err = run(["concepts", "assign", str(tmp_path / "a.npy"), str(tmp_path / "b.safetensors"),
                         "--bank", str(bank), "--top-k", "4", "--out", str(tmp_path / name)], capsys)
        assert code == 0, err
    labels = np.load(tmp_path / "labels.npy")
    with safe_open(str(tmp_path / "labels.safetensors"), "np") as f:
        assert np.array_equal(f.get_tensor("labels"), labels)
    assert labels.dtype == np.int64 and labels.shape == (600, 4)
    float16_rows = torch.cat([rows[:400].half().float(), rows[400:]])  # what the files hold
    assert np.array_equal(labels, brute_force_labels(float16_rows, centres, 4).numpy())
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_the_k_means_sample_is_drawn_from_every_file_and_gives_good_centres(tmp_path):
    rows = features_matrix(num_rows=3000)
    np.save(tmp_path / "a.npy", rows[:1000].numpy())
    np.save(tmp_path / "b.npy", rows[1000:].numpy())
    features = read_features([str(tmp_path / "a.npy"), str(tmp_path / "b.npy")])
    assert len(features) == 3000 and features.dim == 24
    sample = np.array([5, 999, 1000, 2999])
    torch.testing.assert_close(features.take(sample), rows[sample])
    result, settings = build_bank(features, 16, iterations=10, max_points_per_centre=40, seed=0)
    assert settings["num_train_points"] == 640 == result.num_train_points
    # the sample is uniform over both files: the centres fit all 3000 points as well as the 640 they saw
    fit = (F.normalize(rows, dim=1) @ result.centres.T).max(dim=1).values.mean().item()
    assert fit == pytest.approx(result.objective, abs=0.01)


def test_an_encode_folder_gives_labels_aligned_with_its_index(encode_folder, tmp_path, capsys):
    features = load_features(encode_folder)
    assert len(features) == 5 and len(features.failures) == 1
    bank = tmp_path / "bank.safetensors"
    code, err = run(["concepts", "build", str(encode_folder), "--num-concepts", "3", "--out", str(bank),
                     "--backend", "torch"], capsys)
    assert code == 0, err
    out = tmp_path / "labels.npy"
    code, err = run(["concepts", "assign", str(encode_folder), "--bank", str(bank), "--top-k", "3",
                     "--out", str(out)], capsys)
    assert code == 0, err
    centres, settings = load_bank(str(bank))
    assert settings["backend"] == "torch" and settings["num_points"] == 5
    labels = np.load(out)
    assert np.array_equal(labels, brute_force_labels(features.pooled, centres, 3).numpy())
    assert (np.sort(labels, axis=1) == np.arange(3)).all()  # every concept once per row


def test_assign_in_memory_matches_a_memory_mapped_output(tmp_path):
    rows = features_matrix(num_rows=50)
    np.save(tmp_path / "f.npy", rows.numpy())
    centres = F.normalize(torch.randn(7, 24), dim=1)
    labels = assign_concepts(read_features(str(tmp_path / "f.npy")), centres, top_k=7)
    assert np.array_equal(labels, brute_force_labels(rows, centres, 7).numpy())


@pytest.fixture
def files(tmp_path):
    rows = features_matrix(num_rows=40)
    np.save(tmp_path / "f.npy", rows.numpy())
    np.save(tmp_path / "ints.npy", np.arange(40 * 24).reshape(40, 24))
    np.save(tmp_path / "vector.npy", np.zeros(40, dtype=np.float32))
    with_nan = rows.clone()
    with_nan[17, 3] = float("nan")
    np.save(tmp_path / "nan.npy", with_nan.numpy())
    np.save(tmp_path / "narrow.npy", rows[:, :10].numpy())
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "f.npy").read_bytes()[:500])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"x": rows, "y": rows.clone()}, str(tmp_path / "two.safetensors"))
    save_file({"centres": F.normalize(torch.randn(5, 24), dim=1)}, str(tmp_path / "bank.safetensors"))
    save_file({"centres": torch.randn(5, 24)}, str(tmp_path / "not_unit.safetensors"))
    return tmp_path


@pytest.mark.parametrize(("args", "message"), [
    (["build", "missing.npy", "--num-concepts", "3", "--out", "b.safetensors"], "missing.npy does not exist"),
    (["build", "truncated.npy", "--num-concepts", "3", "--out", "b.safetensors"], "truncated.npy: not a readable"),
    (["build", "garbage.safetensors", "--num-concepts", "3", "--out", "b.safetensors"],
     "garbage.safetensors: not a readable safetensors file"),
    (["build", "ints.npy", "--num-concepts", "3", "--out", "b.safetensors"], "features must be floats"),
    (["build", "vector.npy", "--num-concepts", "3", "--out", "b.safetensors"], "must be an [N, D] matrix"),
    (["build", "nan.npy", "--num-concepts", "3", "--out", "b.safetensors"], "nan.npy: row 17 is not finite"),
    (["build", "f.npy", "narrow.npy", "--num-concepts", "3", "--out", "b.safetensors"], "different widths"),
    (["build", "two.safetensors", "--num-concepts", "3", "--out", "b.safetensors"], "expected one matrix"),
    (["build", "f.npy", "--num-concepts", "41", "--out", "b.safetensors"], "cannot make 41 concepts from 40"),
    (["build", "f.npy", "--num-concepts", "3", "--out", "b.npy"], "a bank is a .safetensors file"),
    (["build", "f.npy", "--num-concepts", "3", "--out", "no/b.safetensors"], "no/b.safetensors: its folder"),
    (["assign", "f.npy", "--bank", "bank.safetensors", "--out", "no/b.npy"], "no/b.npy: its folder"),
    (["assign", "f.npy", "--bank", "missing.safetensors", "--out", "b.npy"], "missing.safetensors does not exist"),
    (["assign", "f.npy", "--bank", "garbage.safetensors", "--out", "b.npy"], "not a readable safetensors"),
    (["assign", "f.npy", "--bank", "f.npy", "--out", "b.npy"], "not a readable safetensors"),
    (["assign", "f.npy", "--bank", "not_unit.safetensors", "--out", "b.npy"], "not unit vectors"),
    (["assign", "narrow.npy", "--bank", "bank.safetensors", "--out", "b.npy"],
     "features are 10-dimensional but the bank's centres are 24-dimensional"),
    (["assign", "f.npy", "--bank", "bank.safetensors", "--top-k", "6", "--out", "b.npy"], "top_k must be between"),
    (["assign", "f.npy", "--bank", "bank.safetensors", "--out", "b.txt"], "by the extension"),
    (["assign", "nan.npy", "--bank", "bank.safetensors", "--top-k", "3", "--out", "b.npy"], "row 17 is not finite"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(files, capsys, monkeypatch, args, message):
    monkeypatch.chdir(files)
    before = set(os.listdir(files))
    code, err = run(["concepts", *args], capsys)
    assert code == 2
    assert err.count("error:") == 1 and message in err, err
    assert set(os.listdir(files)) == before  # no bank, no labels, no temporary file left


def test_labels_that_do_not_fit_the_features_or_the_bank_are_refused(files):
    np.save(files / "labels.npy", np.tile(np.arange(5), (40, 1)))
    assert read_labels(str(files / "labels.npy"), num_rows=40, num_classes=5).shape == (40, 5)
    with pytest.raises(FeatureFileError, match="has 40 label rows but the features have 41 rows"):
        read_labels(str(files / "labels.npy"), num_rows=41)
    with pytest.raises(FeatureFileError, match="label 4 is outside the bank's 4 concepts"):
        read_labels(str(files / "labels.npy"), num_classes=4)
    np.save(files / "float_labels.npy", np.zeros((40, 5)))
    with pytest.raises(FeatureFileError, match="int64 matrix"):
        read_labels(str(files / "float_labels.npy"))
    with pytest.raises(FeatureFileError, match="not a readable"):
        read_labels(str(files / "truncated.npy"))
    with pytest.raises(FileNotFoundError, match="nothing.npy does not exist"):
        read_labels(str(files / "nothing.npy"))
