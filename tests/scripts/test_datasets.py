"""Dataset discovery (folder convention, CSV) and the public-dataset converter."""

import csv
from pathlib import Path

import pytest

from scripts.data.convert import convert
from scripts.data.convert import main as convert_main
from scripts.data.datasets import discover, discover_csv, discover_folder, discover_unlabelled, split_holdout
from tests.helpers import REAL_CXR, small_png

SHARED_CXR = REAL_CXR


_png = small_png


@pytest.fixture
def folder_ds(tmp_path):
    root = tmp_path / "ds"
    for i in range(3):
        _png(root / "train/healthy" / f"t{i}.png")
    _png(root / "test/healthy/h0.png")
    _png(root / "test/diseased/d0.png")
    _png(root / "test/diseased/d1.png")
    _png(root / "ground_truth/diseased/d0.png", 255)
    (root / "train/healthy/.hidden.png").write_bytes(b"x")
    (root / "train/healthy/notes.txt").write_text("x")
    return root


def test_folder_convention(folder_ds):
    train = discover_folder(folder_ds, "train")
    assert [d["name"] for d in train] == ["t0.png", "t1.png", "t2.png"]
    assert all(d["label"] == 0 and "gt_mask" not in d for d in train)
    test = discover(folder_ds, "test")
    by_name = {d["name"]: d for d in test}
    assert by_name["h0.png"]["label"] == 0 and by_name["d0.png"]["label"] == 1
    assert by_name["d0.png"]["gt_mask"].endswith("ground_truth/diseased/d0.png")
    assert "gt_mask" not in by_name["d1.png"]


def test_folder_errors(tmp_path, folder_ds):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        discover_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown split"):
        discover_folder(folder_ds, "val")
    (tmp_path / "empty/train/healthy").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        discover_folder(tmp_path / "empty", "train")


def test_csv_list(tmp_path, folder_ds):
    rows = [["image", "label", "mask", "split"],
            ["ds/test/diseased/d0.png", "1", "ds/ground_truth/diseased/d0.png", "test"],
            ["ds/train/healthy/t0.png", "0", "", "train"]]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    items = discover(tmp_path / "list.csv", "test")
    assert len(items) == 1 and items[0]["label"] == 1 and Path(items[0]["gt_mask"]).is_file()
    assert len(discover_csv(tmp_path / "list.csv")) == 2


@pytest.mark.parametrize("row,err", [(["nope.png", "0", ""], "not found"),
                                     (["ds/train/healthy/t0.png", "2", ""], "0 or 1"),
                                     (["ds/train/healthy/t0.png", "x", ""], "0 or 1")])
def test_csv_errors_name_the_line(tmp_path, folder_ds, row, err):
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "mask"], row])
    with pytest.raises((ValueError, FileNotFoundError), match=err) as e:
        discover_csv(tmp_path / "bad.csv")
    assert "bad.csv:2" in str(e.value)


def test_split_holdout_is_deterministic_and_disjoint():
    items = [{"name": f"{i:03d}"} for i in range(50)]
    tr, ho = split_holdout(items, 0.1)
    assert len(ho) == 5 and len(tr) == 45 and not {d["name"] for d in tr} & {d["name"] for d in ho}
    assert split_holdout(items, 0.1) == (tr, ho)
    with pytest.raises(ValueError):
        split_holdout(items[:1], 0.1)


def test_convert_zhanglab_dry_run_and_symlink(tmp_path, capsys):
    src = tmp_path / "chest_xray"
    for sub in ("train/NORMAL/a.jpeg", "train/PNEUMONIA/b.jpeg", "test/NORMAL/c.jpeg", "test/PNEUMONIA/d.jpeg"):
        _png(src / sub.replace(".jpeg", ".png"))
    out = tmp_path / "out"
    counts = convert("zhanglab", tmp_path, out, dry_run=True)
    assert counts["train/healthy"] == 1 and counts["test/diseased"] == 1 and not out.exists()
    assert "dry run" in capsys.readouterr().out
    convert("zhanglab", src, out)
    assert (out / "train/healthy/a.png").is_symlink()
    assert {d["name"] for d in discover_folder(out, "test")} == {"c.png", "d.png"}


def test_convert_zhanglab_unlabelled_sample(tmp_path):
    """train/unlabelled: a fixed, evenly spaced sample of both training classes at the requested anomaly ratio."""
    src = tmp_path / "chest_xray"
    for i in range(10):
        _png(src / f"train/NORMAL/n{i}.png")
        _png(src / f"train/PNEUMONIA/p{i:02d}.png")
    for sub in ("test/NORMAL/c.png", "test/PNEUMONIA/d.png"):
        _png(src / sub)
    out = tmp_path / "out"
    counts = convert("zhanglab", src, out, unlabelled=5, anomaly_ratio=0.6)
    assert counts["train/unlabelled"] == 5 and counts["train/healthy"] == 10
    names = sorted(p.name for p in (out / "train/unlabelled").iterdir())
    assert names == ["n0.png", "n5.png", "p00.png", "p03.png", "p06.png"]  # 3 of 5 pneumonia, evenly spaced
    assert [d["label"] for d in discover_unlabelled(out)] == [-1] * 5  # labels never read
    assert convert("zhanglab", src, tmp_path / "none", unlabelled=0)["train/unlabelled"] == 0
    csv_counts = convert("zhanglab", src, tmp_path / "csv", mode="csv", unlabelled=4)
    assert csv_counts["train/unlabelled"] == 4
    rows = discover_unlabelled(tmp_path / "csv" / "dataset.csv")
    assert len(rows) == 4 and {r["split"] for r in rows} == {"unlabelled"}
    assert len(discover_csv(tmp_path / "csv" / "dataset.csv", "train")) == 10  # never mixed into training
    with pytest.raises(ValueError, match="anomaly_ratio"):
        convert("zhanglab", src, tmp_path / "bad", anomaly_ratio=1.5)


def test_discover_unlabelled_sources(tmp_path, folder_ds):
    plain = tmp_path / "plain"
    _png(plain / "a.png")
    _png(plain / "b.png")
    assert [d["name"] for d in discover_unlabelled(plain)] == ["a.png", "b.png"]
    with pytest.raises(FileNotFoundError, match="no unlabelled images"):
        discover_unlabelled(folder_ds)  # a dataset without train/unlabelled and no images at its top
    with pytest.raises(FileNotFoundError, match="neither"):
        discover_unlabelled(tmp_path / "missing")
    csv_path = tmp_path / "ds.csv"
    csv_path.write_text(f"image,label,split\n{plain / 'a.png'},0,train\n")
    with pytest.raises(FileNotFoundError, match="no rows of split 'unlabelled'"):
        discover_unlabelled(csv_path)
    csv_path.write_text(f"image,label,split\n{plain / 'a.png'},-1,train\n")
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        discover_csv(csv_path)  # -1 (unknown) is allowed only in the unlabelled split


def test_convert_zhanglab_test_only_download(tmp_path, caplog):
    """A zero-shot target holds only test/: it converts, and a download with neither split is a clear error."""
    src = tmp_path / "chest_xray"
    for sub in ("test/NORMAL/c.png", "test/PNEUMONIA/d.png"):
        _png(src / sub)
    counts = convert("zhanglab", src, tmp_path / "out")
    assert counts["test/healthy"] == 1 and counts["test/diseased"] == 1 and counts["train/healthy"] == 0
    assert "test split only" in caplog.text
    assert {d["name"] for d in discover_folder(tmp_path / "out", "test")} == {"c.png", "d.png"}
    with pytest.raises(FileNotFoundError, match="none of"):
        convert("zhanglab", tmp_path / "empty", tmp_path / "out2")


def test_convert_chexpert_and_qata(tmp_path):
    src = tmp_path / "CheXpert-v1.0-small"
    _png(src / "train/patient1/study1/view1_frontal.png")
    _png(src / "train/patient2/study1/view1_frontal.png")
    _png(src / "train/patient2/study1/view2_lateral.png")
    _png(src / "valid/patient9/study1/view1_frontal.png")
    with open(src / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Path", "Frontal/Lateral", "No Finding"],
                                 ["CheXpert-v1.0-small/train/patient1/study1/view1_frontal.png", "Frontal", "1.0"],
                                 ["CheXpert-v1.0-small/train/patient2/study1/view1_frontal.png", "Frontal", ""],
                                 ["CheXpert-v1.0-small/train/patient2/study1/view2_lateral.png", "Lateral", "1.0"]])
    with open(src / "valid.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Path", "Frontal/Lateral", "No Finding"],
                                 ["CheXpert-v1.0-small/valid/patient9/study1/view1_frontal.png", "Frontal", "0.0"]])
    convert("chexpert", src, tmp_path / "cx", mode="copy")
    assert [p.name for p in (tmp_path / "cx/train/healthy").iterdir()] == ["patient1_study1_view1_frontal.png"]
    assert len(list((tmp_path / "cx/test/diseased").iterdir())) == 1

    q = tmp_path / "QaTa-COV19-v2"
    _png(q / "Test Set/Images/covid_1.png")
    _png(q / "Test Set/Ground-truths/mask_covid_1.png", 255)
    convert("qata", q, tmp_path / "qa", mode="csv")
    items = discover_csv(tmp_path / "qa/dataset.csv")
    assert items[0]["label"] == 1 and items[0]["gt_mask"].endswith("mask_covid_1.png")


def test_convert_cli_reports_errors(tmp_path, capsys):
    assert convert_main(["qata", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_CXR.is_dir(), reason="real data ../shared/data/cxr not present")
def test_nih_layout_discovered():
    root = SHARED_CXR / "nih"
    assert len(discover_folder(root, "train")) == 247
    test = discover_folder(root, "test")
    assert sum(d["label"] for d in test) == 109 and sum("gt_mask" in d for d in test) == 15
