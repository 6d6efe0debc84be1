"""Input discovery, per-input preprocessing and collation for `ove encode` (no model involved except where
the image patch list is checked against the dense image)."""

import json
import os

import pytest
import torch

from onevision_encoder.encode.inputs import (
    EncodeDataset,
    InputError,
    Preprocessing,
    collate_samples,
    discover_inputs,
)
from onevision_encoder.processing import image_processor, patchify
from onevision_encoder.synthetic import write_image

TINY = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")


def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_folders_are_walked_in_sorted_order_for_media_only(tmp_path):
    touch(tmp_path / "b" / "z.mp4")
    touch(tmp_path / "b" / "a.JPG")
    touch(tmp_path / "a.webm")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "c" / "labels.csv")
    found = discover_inputs([tmp_path])
    assert found == [str(tmp_path / "a.webm"), str(tmp_path / "b" / "a.JPG"), str(tmp_path / "b" / "z.mp4")]


def test_files_lists_and_folders_keep_input_order_without_repeats(tmp_path):
    video = touch(tmp_path / "data" / "v.mp4")
    image = touch(tmp_path / "data" / "i.png")
    (tmp_path / "list.csv").write_text("label,path\n3,data/i.png\n4,data/missing.mp4\n")
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "data/v.mp4"}) + "\n\n" + json.dumps("data/x.avi") + "\n")
    found = discover_inputs([image, tmp_path / "list.jsonl", tmp_path / "list.csv", tmp_path / "data"])
    # Listed files are not checked here: a missing one becomes that input's failure during the run.
    assert found == [image, video, str(tmp_path / "data" / "x.avi"), str(tmp_path / "data" / "missing.mp4")]


def test_headerless_csv_takes_the_first_column_relative_to_the_list(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.csv").write_text("clips/a.mp4,1\nclips/b.mp4,0\n")
    assert discover_inputs([tmp_path / "sub" / "list.csv"]) == [
        str(tmp_path / "sub" / "clips" / "a.mp4"), str(tmp_path / "sub" / "clips" / "b.mp4")]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nope.mp4", "no such file"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no video or image files"),
    (lambda d: (d / "bad.jsonl").write_text("{\"file\": 1}\n") and d / "bad.jsonl", "'path' key"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        discover_inputs([make(tmp_path)])


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "frames", "budget": 64}, "only applies to mode 'codec'"),
    ({"mode": "codec", "frames": 2, "budget": 513}, "between 256 .* and 512"),
    ({"mode": "codec", "frames": 2, "budget": 255}, "between 256 .* and 512"),
    ({"mode": "image", "frames": 8}, "frames only apply"),
    ({"mode": "dense"}, "mode must be one of"),
])
def test_inconsistent_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing.with_defaults(**kwargs)


def test_published_defaults():
    assert (Preprocessing.with_defaults("codec").frames, Preprocessing.with_defaults("codec").budget) == (64, 2048)
    assert (Preprocessing.with_defaults("frames").frames, Preprocessing.with_defaults("frames").budget) == (16, None)


def test_image_becomes_the_patch_list_of_the_dense_image(tmp_path):
    from onevision_encoder import OneVisionEncoderModel
    from PIL import Image

    path = write_image(tmp_path / "i.jpg", width=300, height=200, seed=3)
    clip = Preprocessing.with_defaults("codec").load(path)
    dense = image_processor(448)(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert torch.equal(clip.pixel_values, patchify(dense[0], 14))
    assert clip.patch_positions.shape == (32 * 32, 3)
    assert clip.patch_positions[:, 0].eq(0).all() and clip.patch_positions[33].tolist() == [0, 1, 1]

    model = OneVisionEncoderModel.from_pretrained(TINY).eval()
    batch = collate_samples([EncodeDataset([path], Preprocessing.with_defaults())[0]])
    with torch.no_grad():
        from_patches = model(**batch.inputs)
        from_image = model(pixel_values=dense)
    torch.testing.assert_close(from_patches.pooler_output, from_image.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_patches.last_hidden_state, from_image.last_hidden_state, atol=1e-4, rtol=1e-4)


def test_a_failing_input_comes_back_as_its_error_and_the_batch_goes_on(tmp_path):
    good = write_image(tmp_path / "good.png", width=64, height=48)
    corrupt_image = touch(tmp_path / "bad.png", b"\x89PNG but not really")
    corrupt_video = touch(tmp_path / "bad.mp4", b"\x00\x00\x00\x18ftypmp42 truncated")
    dataset = EncodeDataset([corrupt_image, good, corrupt_video], Preprocessing.with_defaults("codec", 8, 320))
    batch = collate_samples([dataset[i] for i in range(len(dataset))])
    assert [s.path for s in batch.loaded] == [good]
    assert [s.index for s in batch.failed] == [0, 2]
    assert all(s.error and s.clip is None for s in batch.failed)
    assert "bad.mp4" in batch.failed[1].error or "Error" in batch.failed[1].error
    assert batch.inputs["pixel_values"].shape == (1, 1024, 3 * 14 * 14)
    assert batch.inputs["attention_mask"].sum() == 1024


def test_image_mode_refuses_videos(tmp_path):
    video = touch(tmp_path / "v.mp4")
    sample = EncodeDataset([video], Preprocessing.with_defaults("image"))[0]
    assert sample.clip is None and "images only" in sample.error
