"""Discovery that never drops a file silently: scan_folder's reasons, recursion, DICOM found by its content,
and the CSV rule that keeps abnormal rows without a split out of training."""

import csv
import logging
import os

import numpy as np
import pytest

from scripts.data.datasets import discover, discover_csv, discover_folder, list_images, scan_folder
from tests.helpers import small_png, write_dicom

_png = small_png


@pytest.fixture
def messy(tmp_path):
    """A folder as a hospital export leaves it: images, suffix-less DICOM, and things that are not images."""
    root = tmp_path / "export"
    _png(root / "a.png")
    _png(root / "sub" / "b.png")
    _png(root / "sub" / "deeper" / "c.png")
    _png(root / ".cache" / "d.png")
    write_dicom(root / "IM0001", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096)
    write_dicom(root / "1.2.840.113619.2.55.411", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096)
    (root / "IM0002").write_bytes(b"\0" * 300)  # no preamble
    (root / "x.webp").write_bytes(b"RIFF....WEBPVP8 ")
    (root / "notes.txt").write_text("hello")
    (root / ".hidden.png").write_bytes(b"x")
    (root / "e.png~").write_bytes(b"x")
    (root / "f.png.part").write_bytes(b"x")
    (root / "gone.png").symlink_to(root / "missing.png")
    return root


def test_scan_folder_reports_every_entry_with_a_reason(messy):
    images, skipped = scan_folder(messy)
    assert [p.name for p in images] == ["1.2.840.113619.2.55.411", "IM0001", "a.png"]
    reasons = {p.name: r for p, r in skipped}
    assert set(reasons) == {".cache", ".hidden.png", "IM0002", "e.png~", "f.png.part", "gone.png", "notes.txt",
                            "sub", "x.webp"}
    assert reasons["sub"] == "sub-folder (not scanned: recursive=False)"
    assert reasons[".cache"] == "hidden folder" and reasons[".hidden.png"] == "hidden file"
    assert reasons["e.png~"] == reasons["f.png.part"] == "temporary file"
    assert reasons["gone.png"].startswith("broken symbolic link") and "missing.png" in reasons["gone.png"]
    assert reasons["x.webp"].startswith("unsupported suffix '.webp'")
    assert reasons["notes.txt"].startswith("unsupported suffix '.txt'")
    assert reasons["IM0002"] == "no image suffix and no DICOM preamble ('DICM' at byte 128)"
    assert len(images) + len(skipped) == len(list(messy.iterdir()))  # nothing unaccounted for


def test_list_images_returns_images_and_logs_what_it_skips(messy, caplog):
    with caplog.at_level(logging.DEBUG, logger="scripts.data.datasets"):
        assert list_images(messy) == scan_folder(messy)[0]
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "5 entries not listed" in warning[0].getMessage()
    for name in ("sub", "gone.png", "x.webp", "notes.txt", "IM0002"):
        assert f"'{name}'" in warning[0].getMessage()
    assert any("hidden/temporary" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


def test_recursive_listing(messy):
    names = [p.relative_to(messy).as_posix() for p in list_images(messy, recursive=True)]
    assert names == ["1.2.840.113619.2.55.411", "IM0001", "a.png", "sub/b.png", "sub/deeper/c.png"]  # not .cache/
    assert [p.name for p in list_images(messy / "sub")] == ["b.png"]  # the default is not recursive
    (messy / "sub" / "loop").symlink_to(messy, target_is_directory=True)
    images, skipped = scan_folder(messy, recursive=True)
    assert len(images) == 5 and (messy / "sub" / "loop", "folder already scanned (link loop)") in skipped


def test_scan_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        scan_folder(tmp_path / "nope")
    _png(tmp_path / "a.png")
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "a.png")


def test_dataset_folder_with_suffixless_dicom(tmp_path):
    root = tmp_path / "ds"
    _png(root / "train/healthy/a.png")
    write_dicom(root / "train/healthy/IM0001", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 4096)
    assert [d["name"] for d in discover_folder(root, "train")] == ["IM0001", "a.png"]


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_without_split_never_trains_on_abnormal_rows(tmp_path):
    for name in ("n0", "n1", "d0", "d1", "d2"):
        _png(tmp_path / f"{name}.png")
    no_split = _csv(tmp_path / "nosplit.csv", [["image", "label"], ["n0.png", "0"], ["d0.png", "1"], ["n1.png", "0"],
                                               ["d1.png", "1"], ["d2.png", "1"]])
    with pytest.raises(ValueError, match=r"nosplit\.csv: 3 row\(s\) with label 1 .* no split \(line\(s\) 3, 5, 6\)"):
        discover(no_split, "train")
    with pytest.raises(ValueError, match="3 row"):
        discover_csv(no_split, "train")
    assert [d["label"] for d in discover(no_split, "test")] == [0, 1, 0, 1, 1]  # other splits: every row
    assert len(discover_csv(no_split)) == 5 and len(discover(no_split, "all")) == 5
    # a split column with some empty cells: the same rule; normal rows without a split still train
    mixed = _csv(tmp_path / "mixed.csv", [["image", "label", "split"], ["n0.png", "0", ""], ["n1.png", "0", "train"],
                                          ["d0.png", "1", "test"], ["d1.png", "1", ""]])
    with pytest.raises(ValueError, match=r"mixed\.csv: 1 row\(s\) with label 1 .*line\(s\) 5\)"):
        discover(mixed, "train")
    fixed = _csv(tmp_path / "fixed.csv", [["image", "label", "split"], ["n0.png", "0", ""], ["n1.png", "0", "train"],
                                          ["d0.png", "1", "test"], ["d1.png", "1", "test"]])
    train = discover(fixed, "train")
    assert [d["name"] for d in train] == ["n0.png", "n1.png"] and {d["label"] for d in train} == {0}


def test_broken_link_in_a_dataset_is_reported_not_listed(tmp_path, caplog):
    root = tmp_path / "ds"
    _png(root / "train/healthy/a.png")
    os.symlink(tmp_path / "elsewhere.png", root / "train/healthy/b.png")
    with caplog.at_level(logging.WARNING, logger="scripts.data.datasets"):
        assert [d["name"] for d in discover_folder(root, "train")] == ["a.png"]
    assert "'b.png': broken symbolic link" in caplog.text
