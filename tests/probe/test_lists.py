"""The probe's TRAIN/VAL lists: the three formats, label kinds, and one clear error per bad input."""

import json

import pytest

from onevision_encoder.probe.lists import ListError, label_classes, read_list


@pytest.fixture
def clips(tmp_path):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_published_csv_header_csv_and_jsonl_read_the_same(clips):
    (clips / "pub.csv").write_text("a.mp4,1\nb.mp4,0\n\nc.mp4,2\n")
    (clips / "head.csv").write_text("label,path\n1,a.mp4\n0,b.mp4\n2,c.mp4\n")
    (clips / "list.jsonl").write_text("".join(json.dumps({"path": n, "label": y}) + "\n"
                                              for n, y in (("a.mp4", 1), ("b.mp4", 0), ("c.mp4", 2))))
    read = [[(e.path, e.label) for e in read_list(clips / name)] for name in ("pub.csv", "head.csv", "list.jsonl")]
    assert read[0] == read[1] == read[2]
    assert read[0][0] == (str(clips / "a.mp4"), "1")
    classes, train, _ = label_classes(read_list(clips / "pub.csv"), read_list(clips / "pub.csv"))
    assert classes == ["0", "1", "2"] and train.labels == [1, 0, 2]


def test_class_names_are_numbered_in_sorted_order_and_root_moves_paths(clips, tmp_path_factory):
    lists = tmp_path_factory.mktemp("lists")
    (lists / "train.csv").write_text("a.mp4,zebra\nb.mp4,ant\nc.mp4,moth\n")
    (lists / "val.csv").write_text("c.mp4,ant\n")
    train, val = read_list(lists / "train.csv", root=clips), read_list(lists / "val.csv", root=clips)
    classes, train_clips, val_clips = label_classes(train, val)
    assert classes == ["ant", "moth", "zebra"]
    assert train_clips.labels == [2, 0, 1] and val_clips.labels == [0]
    assert val_clips.paths == [str(clips / "c.mp4")]


@pytest.mark.parametrize("train, val, message", [
    ("a.mp4,0\nmissing.mp4,1\n", "a.mp4,0\n", r"train.csv:2: no such file .*missing.mp4"),
    ("\n\n", "a.mp4,0\n", r"train.csv: the list has no clips"),
    ("a.mp4,0\nb.mp4,cat\n", "a.mp4,0\n", r"train.csv:2: label 'cat' is not an integer"),
    ("a.mp4,0\nb.mp4,-1\n", "a.mp4,0\n", r"train.csv:2: label -1 is out of range"),
    ("a.mp4,0\nb.mp4,1\n", "c.mp4,3\n", r"val.csv:1: class '3' never appears in the training list"),
    ("a.mp4\n", "a.mp4,0\n", r"train.csv:1: expected 'path,label'"),
])
def test_bad_lists_name_the_file_and_line(clips, train, val, message):
    (clips / "train.csv").write_text(train)
    (clips / "val.csv").write_text(val)
    with pytest.raises(ListError, match=message):
        label_classes(read_list(clips / "train.csv"), read_list(clips / "val.csv"))


def test_jsonl_line_without_label(clips):
    (clips / "l.jsonl").write_text('{"path": "a.mp4"}\n')
    with pytest.raises(ListError, match=r"l.jsonl:1: expected a JSON object with 'path' and 'label'"):
        read_list(clips / "l.jsonl")
