"""Training data streams: per-rank order and exact resume, corrupt samples, tar shards, video forms, bad labels."""

import io
import os
import tarfile

import numpy as np
import pytest

from onevision_encoder.synthetic import write_image
from onevision_encoder.train.concepts import FeatureFileError
from onevision_encoder.train.config import HeadConfig, VideoMix
from onevision_encoder.train.data import DataError, HeadStream, Loader, video_forms

LOADER = Loader(patch_size=8, image_size=32, frames=16, budget=64, clip_frames=4, video_size=32)


def _images(folder, count, labels_from=0):
    """`count` images and labels whose first column is the image's own id (so a batch says what it holds)."""
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        write_image(folder / f"{i:02d}.png", width=40, height=36, seed=i)
    labels = np.stack([np.arange(count) + labels_from, np.arange(count)[::-1]], axis=1)
    np.save(folder.parent / f"{folder.name}.npy", labels)
    return HeadConfig(name=folder.name, inputs=[str(folder)], labels=str(folder.parent / f"{folder.name}.npy"),
                      num_classes=64, batch_size=4, labels_per_step=2)


def _ids(stream, batches, size=32):
    return [stream.next_batch(size).labels[:, 0].tolist() for _ in range(batches)]


def test_ranks_share_each_epoch_without_overlap_and_a_restored_stream_continues_exactly(tmp_path):
    head = _images(tmp_path / "imgs", 12)
    ranks = [HeadStream(head, LOADER, 64, seed=3, rank=r, world_size=2) for r in range(2)]
    epoch = [_ids(s, 3) for s in ranks]  # 3 steps of 2 per rank = one epoch of 12
    seen = [i for r in epoch for batch in r for i in batch]
    assert sorted(seen) == list(range(12))
    next_epoch = [i for s in ranks for batch in _ids(s, 3) for i in batch]
    assert sorted(next_epoch) == list(range(12)) and next_epoch != seen  # reshuffled

    single = HeadStream(head, LOADER, 64, seed=3, rank=0, world_size=1)
    _ids(single, 4)
    state = single.state()
    expected = _ids(single, 5)
    resumed = HeadStream(head, LOADER, 64, seed=3, rank=0, world_size=1)
    resumed.restore(state)
    assert _ids(resumed, 5) == expected
    threads = HeadStream(HeadConfig(**{**head.__dict__, "workers": 2}), LOADER, 64, seed=3, rank=0, world_size=1)
    threads.restore(state)
    assert _ids(threads, 5) == expected  # loading threads change nothing in the order
    threads.close()


def test_a_corrupt_image_is_skipped_counted_and_replaced(tmp_path):
    head = _images(tmp_path / "imgs", 8)
    (tmp_path / "imgs" / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    stream = HeadStream(head, LOADER, 64, seed=0, rank=0, world_size=1)
    batches, failures = [], []
    for _ in range(4):  # 16 samples: two epochs and more, the bad one in each
        batches.append(stream.next_batch(32))
        failures += stream.last_failures
    assert all(len(b.labels) == 4 and b.inputs["pixel_values"].shape[:2] == (4, 16) for b in batches)
    held = [i for b in batches for i in b.labels[:, 0].tolist()]
    assert 3 not in held
    # 16 good samples take 3 epochs of 7 good ones: the bad one is met twice, or three times
    assert stream.skipped_total == sum(b.skipped for b in batches) == len(failures) in (2, 3)
    assert all("03.png" in failure for failure in failures)


def test_images_follow_the_stage_size(tmp_path):
    stream = HeadStream(_images(tmp_path / "imgs", 4), LOADER, 64, seed=0, rank=0, world_size=1)
    small, large = stream.next_batch(32), stream.next_batch(48)
    assert small.inputs["pixel_values"].shape == (4, 16, 3 * 8 * 8)
    assert large.inputs["pixel_values"].shape == (4, 36, 3 * 8 * 8)
    assert large.inputs["patch_positions"][0, :, 0].eq(0).all() and large.inputs["patch_positions"][0, -1].tolist() == [0, 5, 5]


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_tar_shards_stream_with_their_labels_and_skip_a_corrupt_sample(tmp_path):
    picture = tmp_path / "p.jpg"
    write_image(picture, width=40, height=36)
    jpeg = picture.read_bytes()
    for shard in range(2):
        samples = [(f"s{shard}{i}", {"jpg": jpeg, "labels": f"{10 * shard + i} 7".encode()}) for i in range(3)]
        if shard == 1:
            samples[1] = ("broken", {"jpg": b"not a jpeg", "labels": b"1 2"})
        _tar(tmp_path / f"shard-{shard:03d}.tar", samples)
    head = HeadConfig(name="web", inputs=[str(tmp_path / "shard-{000..001}.tar")], num_classes=64, batch_size=5,
                      labels_per_step=2)
    stream = HeadStream(head, LOADER, 64, seed=0, rank=0, world_size=1)
    batch = stream.next_batch(32)
    assert sorted(batch.labels[:, 0].tolist()) == [0, 1, 2, 10, 12]
    assert batch.labels[:, 1].eq(7).all() and batch.skipped == 1

    piped = HeadConfig(name="web", inputs=[f"pipe:cat {tmp_path / 'shard-000.tar'}"], num_classes=64, batch_size=3,
                       labels_per_step=2)  # as from object storage: `pipe:aws s3 cp s3://... -`
    assert sorted(HeadStream(piped, LOADER, 64, 0, 0, 1).next_batch(32).labels[:, 0].tolist()) == [0, 1, 2]

    bad = HeadConfig(name="web", inputs=[str(tmp_path / "bad.tar")], num_classes=5, batch_size=1, labels_per_step=2)
    _tar(tmp_path / "bad.tar", [("a", {"jpg": jpeg, "labels": b"1 9"})])
    with pytest.raises(DataError, match="label 9 is outside the bank's 5 concepts"):
        HeadStream(bad, LOADER, 5, seed=0, rank=0, world_size=1).next_batch(32)


def test_video_batches_mix_codec_clips_frame_clips_and_collages(training_data):
    assert video_forms(8, VideoMix()) == ["codec"] * 4 + ["frames"] * 3 + ["collage"]
    assert video_forms(4, VideoMix(codec=1, frames=0, collage=0)) == ["codec"] * 4
    head = HeadConfig(name="videos", inputs=[str(training_data / "videos")], labels=str(training_data / "video_labels.npy"),
                      num_classes=8, batch_size=4, labels_per_step=2, video_mix=VideoMix(codec=2, frames=1, collage=1))
    batch = HeadStream(head, LOADER, 8, seed=0, rank=0, world_size=1).next_batch(32)
    positions = batch.inputs["patch_positions"]
    assert positions.shape == (4, 64, 3) and batch.inputs["attention_mask"].eq(1).all()  # the same 64 tokens
    codec, frames, collage = positions[0], positions[2], positions[3]
    assert codec[:16, 0].eq(0).all() and codec[16:, 0].gt(0).all()  # frame 0 whole, then selected patches
    slots = frames[::16, 0]  # one frame from each quarter of the 64-slot grid (16 frames)
    assert [int(s) // 16 for s in slots] == [0, 1, 2, 3]
    assert collage[:, 0].eq(0).all() and collage[:, 1].max() == 15 and collage[:, 2].max() == 3  # 4 frames stacked


def test_a_corrupt_video_is_skipped_in_every_form(tmp_path, training_data):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.mp4").symlink_to(training_data / "videos" / f"{i}.mp4")
    good = (training_data / "videos" / "3.mp4").read_bytes()
    (folder / "3.mp4").write_bytes(good[: len(good) // 3])  # cut off: its index (moov) or frames are gone
    np.save(tmp_path / "labels.npy", np.array([[i, i] for i in range(4)]))
    head = HeadConfig(name="videos", inputs=[str(folder)], labels=str(tmp_path / "labels.npy"), num_classes=8,
                      batch_size=3, labels_per_step=2, video_mix=VideoMix(codec=1, frames=1, collage=1))
    stream = HeadStream(head, LOADER, 8, seed=0, rank=0, world_size=1)
    held, failures = [], []
    for _ in range(4):
        held += stream.next_batch(32).labels[:, 0].tolist()
        failures += stream.last_failures
    assert len(held) == 12 and 3 not in held
    assert len(failures) == stream.skipped_total >= 3 and all("3.mp4" in f for f in failures)


def test_labels_that_do_not_fit_the_inputs_are_one_clear_error(tmp_path):
    head = _images(tmp_path / "imgs", 6)
    np.save(tmp_path / "short.npy", np.zeros((5, 2), dtype=np.int64))
    with pytest.raises(DataError, match="5 rows of labels but the inputs hold 6 samples"):
        HeadStream(HeadConfig(**{**head.__dict__, "labels": str(tmp_path / "short.npy")}), LOADER, 64, 0, 0, 1)
    with pytest.raises(FeatureFileError, match="outside the bank's 4 concepts"):
        HeadStream(head, LOADER, 4, 0, 0, 1)
    with pytest.raises(DataError, match="2 labels a sample, fewer than labels_per_step=8"):
        HeadStream(HeadConfig(**{**head.__dict__, "labels_per_step": 8}), LOADER, 64, 0, 0, 1)
    with pytest.raises(DataError, match="not a multiple of the 4 ranks"):
        HeadStream(HeadConfig(**{**head.__dict__, "batch_size": 6}), LOADER, 64, 0, 0, 4)
