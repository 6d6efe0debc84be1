import numpy as np
from PIL import Image

from onevision_encoder.plotting import plot_curves


def test_curves_are_drawn_one_panel_per_entry(tmp_path):
    one = plot_curves(str(tmp_path / "one.png"), {"loss": {"train": ([1, 2, 3], [3.0, 2.0, 1.0])}}, "epoch")
    two = plot_curves(str(tmp_path / "two.png"),
                      {"loss": {"train": ([1, 2], [2.0, 1.0])}, "accuracy": {"top1": ([1, 2], [10.0, 50.0]),
                                                                              "top5": ([1, 2], [30.0, 90.0])}},
                      "epoch", title="run")
    a, b = Image.open(one), Image.open(two)
    assert a.format == b.format == "PNG"
    assert b.width == 2 * a.width and b.height == a.height
    pixels = np.asarray(a.convert("L"))
    assert pixels.min() < 100 < pixels.max()  # something was drawn on the white canvas


def test_a_panel_without_data_still_gives_a_picture(tmp_path):
    path = plot_curves(str(tmp_path / "empty.png"), {"loss": {"train": ([], [])}}, "step")
    assert Image.open(path).format == "PNG"
