"""The synthesis benchmark and the every-method figure run on small phantom images."""

from __future__ import annotations

import cv2
import pytest

from scripts.data.phantoms import make_phantom, phantom_rng


@pytest.fixture(scope="module")
def healthy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cxr") / "nih" / "train" / "healthy"
    folder.mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(folder / f"p{i}.png"), make_phantom(phantom_rng(0, "train_healthy", i), size=96)[0])
    return folder


def test_synthesis_benchmark_prints_every_method(healthy_dir, capsys):
    from scripts.benchmarks.synthesis import ROWS, main

    assert main(["--data", str(healthy_dir.parents[2]), "--images", "3", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    for row in ROWS:
        assert row in out
    assert main(["--data", str(healthy_dir.parents[2]), "--images", "3", "--runs", "1", "--methods", "fpi"]) == 0
    assert "nsa" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--data", str(healthy_dir.parents[2]), "--methods", "bogus"])


def test_figure_of_every_method(healthy_dir, tmp_path):
    from scripts.cli.figure_methods import METHODS, main

    out = tmp_path / "methods.png"
    assert main(["--input", str(healthy_dir), "--n", "2", "--size", "64", "--out", str(out)]) == 0
    grid = cv2.imread(str(out))
    assert grid.shape[1] == (len(METHODS) + 1) * (64 + 2) and grid.shape[0] > 2 * 64
    assert main(["--input", str(tmp_path / "nothing"), "--out", str(out)]) == 2
