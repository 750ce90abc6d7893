"""Hardening pieces of :mod:`scripts.robust` and :mod:`scripts.handlers` on their own: config checks, image
screening, non-finite guards, atomic checkpoint files and choosing the checkpoint to resume from."""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from monai.transforms import Compose, RandomizableTransform, Transform

from scripts.robust import (
    AtomicDiskSaver,
    BadImageError,
    NonFiniteError,
    ScreenedCacheDataset,
    ScreenedItems,
    check_finite_terms,
    check_finite_weights,
    check_image_size,
    check_learning_rate,
    check_on_bad_image,
    check_training_config,
    checkpoint_candidates,
    load_newest_checkpoint,
    n_bad_images,
    remove_stale_temp_files,
    screen_items,
    screen_split,
)
from tests.helpers import REPO

# ------------------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0, 0.0, -1e-3, "nan", "fast", True,
                                   None, [1e-3]])
def test_learning_rate_rejected_with_key(value):
    with pytest.raises(ValueError, match=r"hparams#learning_rate must be a finite number > 0, got"):
        check_learning_rate(value)


@pytest.mark.parametrize("value,expected", [(1e-4, 1e-4), (1, 1.0), ("3e-4", 3e-4), (np.float32(0.5), 0.5)])
def test_learning_rate_accepted(value, expected):
    assert check_learning_rate(value) == pytest.approx(expected)


def test_image_size_checked_against_the_unet_strides():
    from monai.networks.nets import UNet

    from scripts.networks import FeatureUNet

    net = FeatureUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8, 8, 8, 8), strides=(2, 2, 2, 2))
    with pytest.raises(ValueError) as e:
        check_image_size(250, net)
    assert str(e.value) == ("image_size 250 is not divisible by 16 (the product of network_strides [2, 2, 2, 2]); "
                            "nearest valid sizes: 240, 256")
    assert check_image_size(256, net) == 256
    with pytest.raises(ValueError, match="nearest valid sizes: 8$"):  # no size 0 offered
        check_image_size(6, UNet(2, 1, 1, channels=(4, 8, 8), strides=(2, 4)))
    assert check_image_size(24, UNet(2, 1, 1, channels=(4, 8, 8), strides=(2, 4))) == 24
    assert check_image_size("big", net) == "big"  # not a size: the loader's own check names it


def test_image_size_not_checked_for_other_networks():
    from monai.networks.nets import ResNet

    resnet = ResNet("basic", [1, 1, 1, 1], [1, 1, 1, 1], spatial_dims=2, n_input_channels=1, num_classes=2)
    assert check_image_size(250, resnet) == 250
    assert check_image_size(250, None) == 250


def test_training_config_checks_each_rule():
    from scripts.networks import FeatureUNet

    net = FeatureUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8, 8), strides=(2, 2))
    good = {"learning_rate": 1e-3, "image_size": 64, "on_bad_image": "skip"}
    assert check_training_config(good, net) is good
    for bad, fragment in [({"learning_rate": float("nan")}, "learning_rate"), ({"image_size": 66}, "image_size 66"),
                          ({"on_bad_image": "ignore"}, "'ignore'")]:
        with pytest.raises(ValueError, match=fragment):
            check_training_config({**good, **bad}, net)
    assert check_on_bad_image("error") == "error"


# ------------------------------------------------------------------------------------------- screening

class Load(Transform):
    """Deterministic test transform: counts its calls per file; raises for files named ``bad*``."""

    def __init__(self):
        self.calls = Counter()

    def __call__(self, d):
        self.calls[d["image"]] += 1
        if d["image"].startswith("bad"):
            from custom_transforms.io import CXRReadError

            raise CXRReadError(d["image"], "not a readable PNG/JPEG/BMP/TIFF image (corrupt or wrong format)")
        return {**d, "x": len(d["image"])}


class Jitter(RandomizableTransform):
    def __call__(self, d):
        self.randomize(None)
        return {**d, "r": self.R.rand()}


def _items(*names):
    return [{"image": n} for n in names]


def test_screen_skips_and_logs_bad_items(caplog):
    load = Load()
    with caplog.at_level(logging.WARNING, logger="scripts.robust"):
        good = screen_items(_items("a", "bad1", "b", "bad2"), Compose([load]), "skip", what="training")
    assert list(good) == _items("a", "b") and isinstance(good, list)
    assert good.bad == [("bad1", "not a readable PNG/JPEG/BMP/TIFF image (corrupt or wrong format)"),
                        ("bad2", "not a readable PNG/JPEG/BMP/TIFF image (corrupt or wrong format)")]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("'bad1'" in m and "not a readable" in m for m in lines) == 1
    assert n_bad_images([good, ScreenedItems(_items("c"))]) == 2 and n_bad_images([[], []]) == 0


def test_screen_error_mode_names_the_first_bad_file():
    with pytest.raises(BadImageError, match=r"training image 'bad1' cannot be used: not a readable") as e:
        screen_items(_items("a", "bad1", "bad2"), Compose([Load()]), "error")
    assert e.value.path == "bad1"


def test_screen_all_bad_is_a_clear_error():
    with pytest.raises(BadImageError, match="no usable validation images: all 2 failed"):
        screen_items(_items("bad1", "bad2"), Compose([Load()]), "skip", what="validation")
    assert screen_items([], Compose([Load()])) == []  # nothing to screen is not an error here


def test_screen_split_keeps_the_split_and_counts(caplog):
    with caplog.at_level(logging.INFO, logger="scripts.robust"):
        train, val = screen_split([_items("a", "bad1", "b"), _items("bad2", "c")], Compose([Load()]), "skip",
                                  num_workers=2)
    assert list(train) == _items("a", "b") and list(val) == _items("c")
    assert n_bad_images((train, val)) == 2
    assert any("2 of 5 images left out" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cache_rate", [1.0, 0.5])
def test_cache_reuses_the_screening_outputs(cache_rate):
    load, jitter = Load(), Jitter()
    data = screen_items(_items("a", "bad", "bb", "ccc", "dddd"), Compose([load]), keep_outputs=cache_rate)
    ds = ScreenedCacheDataset(data, Compose([load, jitter]), cache_rate=cache_rate, num_workers=1, progress=False)
    assert len(ds) == 4 and not data.outputs  # released once cached
    n_cached = int(4 * cache_rate)
    assert all(load.calls[n] == 1 for n in ("a", "bb", "ccc", "dddd")), load.calls  # cached once, by screening
    out = [ds[i] for i in range(4)]
    assert [o["x"] for o in out] == [1, 2, 3, 4] and all("r" in o for o in out)
    expected = {n: 1 if i < n_cached else 2 for i, n in enumerate(("a", "bb", "ccc", "dddd"))}
    assert {n: load.calls[n] for n in expected} == expected


def test_cache_recomputes_when_the_transforms_differ():
    first, other = Load(), Load()
    data = screen_items(_items("a", "bb"), Compose([first]))
    ds = ScreenedCacheDataset(data, Compose([other, Jitter()]), cache_rate=1.0, progress=False)
    assert other.calls == Counter({"a": 1, "bb": 1}) and ds[1]["x"] == 2


def test_corrupt_png_is_named_with_its_reason(tmp_path):
    from custom_transforms import LoadCXRd

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    import cv2

    cv2.imwrite(str(good), (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    bad.write_bytes(b"not an image at all" * 10)
    kept = screen_items([{"image": str(good)}, {"image": str(bad)}], Compose([LoadCXRd("image", size=64)]))
    assert [i["image"] for i in kept] == [str(good)]
    assert kept.bad[0][0] == str(bad) and kept.bad[0][1].startswith("not a readable PNG")


# ------------------------------------------------------------------------------------------- non-finite values

def test_non_finite_terms_named_with_iteration():
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.iteration = 2, 7
    engine.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e6)
    check_finite_terms({"loss": 1.0, "dice": torch.tensor(0.5)}, engine)
    with pytest.raises(NonFiniteError) as e:
        check_finite_terms({"loss": float("nan"), "local": torch.tensor(float("inf")), "dice": 0.25}, engine)
    msg = str(e.value)
    assert "epoch 2, iteration 7" in msg and "loss=nan" in msg and "local=inf" in msg and "dice=0.25" in msg
    assert "1000000.0" in msg and isinstance(e.value, RuntimeError)


def test_non_finite_weights_refused():
    net = torch.nn.Linear(2, 2)
    check_finite_weights({"model": net, "optimizer": object()}, "model.pt")
    with torch.no_grad():
        net.bias[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to write model.pt: 'model' has non-finite values in 'bias'"):
        check_finite_weights({"model": net}, "model.pt")


def test_finite_loss_guard_stops_an_engine():
    from scripts.handlers import FiniteLossGuard

    losses = iter([1.0, 0.5, float("nan"), 0.1])
    engine = Engine(lambda e, b: {"loss": torch.tensor(next(losses))})
    FiniteLossGuard().attach(engine)
    with pytest.raises(NonFiniteError, match="iteration 3"):
        engine.run([0] * 4, max_epochs=1)


# ------------------------------------------------------------------------------------------- checkpoint files

def _engine(epoch: int) -> Engine:
    e = Engine(lambda e, b: None)
    e.state.epoch = epoch
    return e


def _half_written_then(exc):
    """A ``torch.save`` that writes half of the file and then fails."""
    real = torch.save

    def save(obj, f, **kwargs):
        buf = io.BytesIO()
        real(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        raise exc

    return save


def test_old_checkpoint_removed_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    net = torch.nn.Linear(3, 2)
    ck = Checkpoint({"model": net, "trainer": _engine(1)}, AtomicDiskSaver(tmp_path), filename_prefix="train",
                    score_function=lambda e: e.state.epoch, score_name="epoch", n_saved=1)
    ck(_engine(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_checkpoint_epoch=1.pt"]
    with monkeypatch.context() as m:
        m.setattr(torch, "save", _half_written_then(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space"):
            ck(_engine(2))
    # the failed write left nothing behind and took nothing away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_checkpoint_epoch=1.pt"]
    assert torch.load(tmp_path / "train_checkpoint_epoch=1.pt", weights_only=True)["model"]["bias"].shape == (2,)
    ck(_engine(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_checkpoint_epoch=3.pt"]
    (tmp_path / "plain").write_bytes(b"")  # same permissions as any new file (the umask decides)
    assert (tmp_path / "train_checkpoint_epoch=3.pt").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_fixed_name_staged_until_commit(tmp_path):
    saver = AtomicDiskSaver(tmp_path, filename="model.pt", stage=True)
    saver({"w": torch.zeros(2)}, "whatever.pt")
    assert not (tmp_path / "model.pt").exists() and len(list(tmp_path.glob(".model.pt.*.tmp"))) == 1
    saver({"w": torch.ones(2)}, "whatever.pt")  # a newer staged version replaces the older one
    assert len(list(tmp_path.glob(".model.pt.*.tmp"))) == 1
    saver.remove("whatever.pt")  # ignite removes the old best first: must not delete the file being replaced
    assert saver.commit() == [tmp_path / "model.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.ones(2))
    saver({"w": torch.full((2,), 2.0)}, "x.pt")
    saver.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


KILL_DURING_SAVE = textwrap.dedent("""
    import io, pathlib, sys, time
    import torch
    from scripts.robust import AtomicDiskSaver

    folder, flag = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    real = torch.save

    def stall(obj, f, **kwargs):  # write half of the file, then hang until killed
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        flag.write_text("writing")
        time.sleep(120)

    torch.save = stall
    AtomicDiskSaver(folder, filename="model.pt")({"w": torch.ones(1000)}, "model.pt")
""")


def test_sigkill_during_model_write_keeps_the_old_file(tmp_path):
    folder, flag = tmp_path / "models", tmp_path / "flag"
    folder.mkdir()
    torch.save({"w": torch.zeros(1000)}, folder / "model.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(folder), str(flag)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    temps = list(folder.glob(".model.pt.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the partial file is a hidden temporary file
    assert torch.equal(torch.load(folder / "model.pt", weights_only=True)["w"], torch.zeros(1000))
    assert remove_stale_temp_files(folder) == temps  # its process is gone
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt"]


def test_stale_temp_files_of_live_processes_are_kept(tmp_path):
    mine = tmp_path / f".model.pt.{os.getpid()}.tmp"
    mine.write_bytes(b"x")
    (tmp_path / ".hidden.tmp").write_bytes(b"y")  # not one of ours
    assert remove_stale_temp_files(tmp_path) == []
    assert mine.exists() and (tmp_path / ".hidden.tmp").exists()


def test_newest_loadable_checkpoint_is_taken(tmp_path, caplog):
    def save(epoch, **extra):
        torch.save({"trainer": {"epoch": epoch}, **extra}, tmp_path / f"train_checkpoint_epoch={epoch}.pt")

    for epoch in (2, 9, 10):
        save(epoch)
    os.utime(tmp_path / "train_checkpoint_epoch=2.pt", (time.time() + 100, time.time() + 100))  # newer mtime
    assert [p.name for p in checkpoint_candidates(tmp_path)] == [f"train_checkpoint_epoch={e}.pt" for e in (10, 9, 2)]
    data = (tmp_path / "train_checkpoint_epoch=10.pt").read_bytes()
    (tmp_path / "train_checkpoint_epoch=10.pt").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "train_checkpoint_epoch=11.pt").write_bytes(b"")  # empty
    with caplog.at_level(logging.WARNING, logger="scripts.robust"):
        path, content = load_newest_checkpoint(tmp_path)
    assert path.name == "train_checkpoint_epoch=9.pt" and content["trainer"]["epoch"] == 9
    assert sum("cannot be loaded" in r.getMessage() for r in caplog.records) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train_checkpoint_epoch=10.pt.unreadable", "train_checkpoint_epoch=11.pt.unreadable",
        "train_checkpoint_epoch=2.pt", "train_checkpoint_epoch=9.pt"]
    assert load_newest_checkpoint(tmp_path / "nothing_here") == (None, None)


def test_run_state_round_trip_is_weights_only_loadable(tmp_path):
    from scripts.handlers import RunState

    rs = RunState()
    rs.mlflow_run_id, rs.best_metric, rs.best_epoch, rs.best_sha256 = "abc", 0.25, 3, "f" * 64
    torch.save({"run": rs.state_dict()}, tmp_path / "c.pt")
    other = RunState()
    other.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["run"])
    assert other.state_dict() == rs.state_dict() and not other.active
    assert math.isclose(other.best_metric, 0.25)
