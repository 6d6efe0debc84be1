"""The probe's generated datasets: the brief event shows only in its window and only it has colour; the
motion-direction square moves the way its label says; the lists are in the published format."""

import numpy as np
import pytest

from onevision_encoder.probe.lists import label_classes, read_list
from onevision_encoder.synthetic import (DIRECTIONS, EVENT_COLOURS, render_brief_event, render_motion_direction,
                                         write_probe_dataset)


@pytest.mark.parametrize("label", range(4))
def test_brief_event_is_coloured_and_only_in_its_window(label):
    frames, (first, stop) = render_brief_event(label, num_frames=150, seed=label)
    assert stop - first == 3  # 2% of 150
    colour = np.array(EVENT_COLOURS[label])
    shows = [bool((np.abs(f.astype(int) - colour).max(-1) == 0).sum() > 100) for f in frames]
    assert [i for i, s in enumerate(shows) if s] == list(range(first, stop))
    grey = [f for i, f in enumerate(frames) if not first <= i < stop]
    assert all((g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all() for g in grey)


@pytest.mark.parametrize("label", range(4))
def test_motion_direction_moves_as_labelled(label):
    frames = render_motion_direction(label, num_frames=6, width=96, height=96, seed=label, trail=0)
    changed = np.abs(frames[1].astype(int) - frames[0].astype(int)).sum(-1) > 0
    dy, dx = DIRECTIONS[label]
    # Cross-correlate consecutive frames over small shifts: the best shift is the motion (2 px a frame).
    a, b = frames[2].astype(float), frames[3].astype(float)
    errors = {(sy, sx): np.abs(np.roll(a, (sy, sx), (0, 1)) - b).mean() for sy in (-2, 0, 2) for sx in (-2, 0, 2)}
    masked = {k: v for k, v in errors.items() if k != (0, 0)}
    assert changed.any() and min(masked, key=masked.get) == (2 * dy, 2 * dx)


def test_written_lists_are_the_published_format(tmp_path):
    train, val = write_probe_dataset(tmp_path, "motion_direction", 2, 1, 1, num_frames=4, width=32, height=32)
    with open(train) as f:
        assert f.read() == "videos/train_0000_0.mp4,0\nvideos/train_0000_1.mp4,1\n"
    classes, train_clips, val_clips = label_classes(read_list(train), read_list(val))
    assert classes == ["0", "1"] and val_clips.labels == [0, 1]
