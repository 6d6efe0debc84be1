"""Kept patches painted from the decoded planes after the choice, against whole pictures made while decoding."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from onevision_encoder import select_patches
from onevision_encoder.codec import patch_pictures
from onevision_encoder.codec import scan as scan_module
from onevision_encoder.codec import scan_video
from onevision_encoder.codec.patch_pictures import PatchWindows, axis_weights
from onevision_encoder.processing import normalize, patchify
from onevision_encoder.synthetic import write_video



def _dense(starts, weights, length):
    matrix = np.zeros((len(starts), length))
    for i, (s, w) in enumerate(zip(starts, weights)):
        n = min(len(w), length - s)
        matrix[i, s : s + n] = w[:n]
    return matrix


@pytest.mark.parametrize("shape", [(90, 160, 224, 398), (144, 176, 224, 274), (37, 53, 20, 31)])
def test_axis_weights_are_pils_bicubic(shape):
    """The weights resample a float image exactly as PIL's antialiased bicubic does (down and up)."""
    h, w, out_h, out_w = shape
    image = np.random.default_rng(0).random((h, w)).astype(np.float32)
    want = np.asarray(Image.fromarray(image, mode="F").resize((out_w, out_h), Image.BICUBIC))
    rows = _dense(*axis_weights(h, out_h, 0, out_h), h)
    cols = _dense(*axis_weights(w, out_w, 0, out_w), w)
    assert np.abs(rows @ image @ cols.T - want).max() < 1e-4


@pytest.mark.parametrize("factor", [1, 2])
def test_patch_windows_fold_subsampled_samples(factor):
    """Grouped per patch on a plane subsampled by `factor`, the weights give what the per-pixel weights give
    on the plane upsampled by repetition (how a full-resolution RGB conversion takes chroma)."""
    length, resized, patch = 101, 56, 14
    plane = np.random.default_rng(1).random(-(-length // factor))
    upsampled = np.repeat(plane, factor)[:length]
    starts, weights = axis_weights(length, resized, 0, resized)
    want = _dense(starts, weights, length) @ upsampled
    windows = PatchWindows.of(starts, weights, patch, length, factor)
    got = np.concatenate([windows.weights[i].double().numpy() @ plane[f : f + windows.weights.shape[2]]
                          for i, f in enumerate(windows.first)])
    assert np.abs(got - want).max() < 1e-5


def _compare(path, budget, size=224, patch_size=14, resize="crop"):
    """The kept patches of a selection painted from held frames vs cut from whole pictures made while decoding
    (FFmpeg's RGB, torch's resize): mean absolute difference and PSNR over the picture's pixels, in levels."""
    geometry = dict(size=size, patch_size=patch_size, resize=resize)
    kept = select_patches(path, budget=budget, **geometry).kept
    painted = scan_video(path, pictures=False, **geometry)
    whole = scan_video(path, **geometry)
    assert painted.pictures is None and painted.painter is not None and whole.painter is None
    rows = size // patch_size
    _, row, col = kept.nonzero(as_tuple=True)
    inside = painted.geometry.picture_mask().view(rows, patch_size, rows, patch_size).transpose(1, 2)[row, col]
    diff = (painted.kept_pictures(kept).float() - whole.kept_pictures(kept).float()).transpose(0, 1)[:, inside]
    return diff.abs(), 10 * torch.log10(255**2 / diff.pow(2).mean())


@pytest.mark.parametrize("options", [
    dict(pix_fmt="yuv420p"), dict(pix_fmt="yuvj420p"), dict(pix_fmt="yuv444p", width=101, height=77),
    dict(pix_fmt="yuv422p"), dict(rotation=90),
])
def test_painted_patches_match_whole_pictures(tmp_path, options):
    opts = dict(dict(width=192, height=144), **options)
    meta = write_video(tmp_path / "v.mp4", num_frames=40, **opts)
    for resize in ("crop", "letterbox"):
        diff, psnr = _compare(meta["path"], budget=1024, resize=resize)
        assert psnr > 40 and diff.mean() < 2, (options, resize, psnr, diff.mean())
        assert diff.max() < 64  # no misplaced window: those differ by the picture's contrast


def test_painted_patches_on_real_footage(published_selection):
    """The shared real clip (BT.709, portrait), both geometries of the published paths."""
    clip = os.path.join(published_selection, "clip.mp4")
    diff, psnr = _compare(clip, budget=2048)
    assert psnr > 40 and diff.mean() < 2
    diff, psnr = _compare(clip, budget=10368, size=576, patch_size=16, resize="letterbox")
    assert psnr > 40 and diff.mean() < 2


def test_chunks_cover_each_entry_once_in_runs_of_one_value():
    values = np.sort(np.random.default_rng(2).integers(0, 9, 500))
    for size in (1, 7, 64, 1000):
        covered = []
        for lo, hi, pieces in patch_pictures._chunks(values, size):
            assert 0 < hi - lo <= size and pieces[0][1] == 0 and pieces[-1][2] == hi - lo
            for value, start, end in pieces:
                assert (values[lo + start : lo + end] == value).all()
                covered.extend(range(lo + start, lo + end))
        assert covered == list(range(len(values)))


def test_painting_in_chunks_gives_the_same_pixels(tmp_path, monkeypatch):
    """A few windows at a time (windows of one patch column split across chunks) or all at once: the same bits."""
    meta = write_video(tmp_path / "v.mp4", num_frames=40, width=320, height=240)
    scan = scan_video(meta["path"], pictures=False)
    kept = select_patches(meta["path"], budget=1024).kept
    monkeypatch.setattr(patch_pictures, "CHUNK_BYTES", 1 << 40)
    at_once = scan.kept_pictures(kept)
    monkeypatch.setattr(patch_pictures, "CHUNK_BYTES", 20_000)  # a handful of windows a chunk
    assert torch.equal(scan.kept_pictures(kept), at_once)


def test_frames_too_large_to_hold_or_not_planar_get_pictures_while_decoding(tmp_path, monkeypatch):
    meta = write_video(tmp_path / "v.mp4", num_frames=30, width=96, height=64)
    assert scan_video(meta["path"], pictures=False).pictures is None
    painted = scan_video(meta["path"], pictures=False).frames
    whole = scan_video(meta["path"]).frames
    assert (painted - whole).abs().mean() < 2 / 255
    deep = write_video(tmp_path / "deep.mp4", num_frames=30, width=96, height=64, pix_fmt="yuv420p10le")
    assert scan_video(deep["path"], pictures=False).pictures is not None
    monkeypatch.setattr(scan_module, "HELD_FRAMES_BYTES", 1000)
    held = scan_video(meta["path"], pictures=False)
    assert held.pictures is not None and held.painter is None
    clip, whole = select_patches(meta["path"]), scan_video(meta["path"])  # whole: pictures made while decoding
    assert torch.equal(clip.pixel_values, normalize(whole.geometry.to_float(whole.kept_pictures(clip.kept))).flatten(1))


def test_a_selection_is_the_same_whatever_the_threads_and_keep_frames(tmp_path, torch_threads):
    """One way to pixels per video: the same patches in one torch thread (no workers, as in DataLoader workers)
    and in two (workers beside the decoder), with or without the frames kept for display, which show them."""
    meta = write_video(tmp_path / "v.mp4", num_frames=40, width=160, height=96)
    with torch_threads(1):
        alone = select_patches(meta["path"])
    with torch_threads(2):
        beside = select_patches(meta["path"])
        shown = select_patches(meta["path"], keep_frames=True)
    assert torch.equal(alone.pixel_values, beside.pixel_values) and torch.equal(alone.pixel_values, shown.pixel_values)
    patches = patchify(normalize(shown.frames), 14).flatten(0, 1)[shown.kept.flatten()]
    assert torch.allclose(patches, shown.pixel_values, atol=1e-6)
