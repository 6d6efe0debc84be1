"""The probe's TRAIN/VAL lists and their labels.

Three formats, told apart by extension and first line: the published CSV (`relative_path,label`, no header),
a CSV with a header naming `path` and `label` columns, or JSONL (`{"path": ..., "label": ...}` per line).
Relative paths are relative to `root` when given, else to the list's own folder. Labels are either all
integers (class i = label i) or all class names (numbered in sorted order).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass


class ListError(ValueError):
    """A TRAIN/VAL list, or one of its lines, cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Entry:
    """One line of a list: the clip's absolute path and its label as written, with where it came from."""

    path: str
    label: str
    where: str  # "list.csv:12", for error messages


@dataclass(frozen=True)
class LabelledClips:
    """A list's clips with integer labels."""

    paths: list[str]
    labels: list[int]


def read_list(list_path: str | os.PathLike, root: str | os.PathLike | None = None, check_files: bool = True) -> list[Entry]:
    """The entries of one list, in order. Raises `ListError` for an empty list, a malformed line or (with
    check_files) a clip that does not exist, naming the file and line."""
    list_path = os.fspath(list_path)
    if not os.path.isfile(list_path):
        raise ListError(f"{list_path}: no such list file")
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(list_path))
    with open(list_path, newline="", encoding="utf-8") as f:
        rows = list(_jsonl_rows(f, list_path) if list_path.lower().endswith(".jsonl") else _csv_rows(f, list_path))
    if not rows:
        raise ListError(f"{list_path}: the list has no clips")
    entries = []
    for number, path, label in rows:
        where = f"{list_path}:{number}"
        full = os.path.abspath(os.path.join(base, os.path.expanduser(path)))
        if check_files and not os.path.isfile(full):
            raise ListError(f"{where}: no such file {full}")
        entries.append(Entry(full, label, where))
    return entries


def _csv_rows(f, list_path: str):
    reader = csv.reader(f)
    columns = (0, 1)
    for number, row in enumerate(reader, 1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        if number == 1 and "path" in cells and "label" in cells:  # a header row names the columns
            columns = (cells.index("path"), cells.index("label"))
            continue
        if len(cells) <= max(columns) or not cells[columns[0]] or not cells[columns[1]]:
            raise ListError(f"{list_path}:{number}: expected 'path,label', got {','.join(row)!r}")
        yield number, cells[columns[0]], cells[columns[1]]


def _jsonl_rows(f, list_path: str):
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            path, label = entry["path"], entry["label"]
        except (ValueError, KeyError, TypeError):
            raise ListError(f"{list_path}:{number}: expected a JSON object with 'path' and 'label'") from None
        yield number, str(path), str(label)


def _is_integer(label: str) -> bool:
    return label.lstrip("+-").isdigit()


def label_classes(train: list[Entry], val: list[Entry]) -> tuple[list[str], LabelledClips, LabelledClips]:
    """(class names, train clips, val clips) with integer labels.

    Integer labels give classes 0..max(train label) named by their numbers; names are numbered in sorted
    order. Mixed kinds, negative labels and a val class that no training clip has are `ListError`s naming
    the line."""
    first = train[0]
    integers = _is_integer(first.label)
    for entry in train + val:
        if _is_integer(entry.label) != integers:
            kind = "an integer" if integers else "a class name"
            raise ListError(f"{entry.where}: label {entry.label!r} is not {kind} like the first label "
                            f"({first.where}: {first.label!r}); use integers or class names throughout")
    if integers:
        for entry in train + val:
            if int(entry.label) < 0:
                raise ListError(f"{entry.where}: label {entry.label} is out of range (labels are 0, 1, ...)")
        num_classes = max(int(e.label) for e in train) + 1
        classes = [str(i) for i in range(num_classes)]
        index = {str(int(e.label)): int(e.label) for e in train}
        key = lambda e: str(int(e.label))  # noqa: E731 - "07" and "7" are one class
    else:
        classes = sorted({e.label for e in train})
        index = {name: i for i, name in enumerate(classes)}
        key = lambda e: e.label  # noqa: E731
    for entry in val:
        if key(entry) not in index:
            raise ListError(f"{entry.where}: class {entry.label!r} never appears in the training list")
    train_clips = LabelledClips([e.path for e in train], [index[key(e)] for e in train])
    val_clips = LabelledClips([e.path for e in val], [index[key(e)] for e in val])
    return classes, train_clips, val_clips
