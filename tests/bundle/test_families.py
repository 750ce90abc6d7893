"""The other model families of the comparison as bundles: AnatPaste's classifier and SAGAN.

Each family is trained once per module at tiny sizes on demo phantoms with ``configs/train.json`` + its method
file (``configs/methods/anatpaste_classifier.json``, ``configs/methods/sagan.json``), then evaluated with
``configs/evaluate.json``, run through ``configs/inference.json`` + its inference override on PNG and DICOM,
exported with ``ckpt_export`` and checked with ``verify_net_in_out``, the way the other bundle tests do.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.bundle.test_workflows import META, make_parser, make_workflow, run_workflow
from tests.helpers import REPO, error_chain, write_dicom

CONFIGS = REPO / "configs"
TINY = str(REPO / "tests" / "configs" / "tiny.json")
FAMILIES = {
    # family: (method file, tiny overrides, the network's output channels)
    "anatpaste_classifier": (
        "anatpaste_classifier.json",
        {"hparams#head_dims": [512, 16], "hparams#batch_size": 2, "hparams#lr_restart_epochs": 2}, 2),
    "sagan": (
        "sagan.json",
        {"hparams#sagan_channels": 4, "hparams#critic_channels": 4, "hparams#sagan_res_blocks": 1,
         "hparams#batch_size": 2, "hparams#image_size": 32, "hparams#critic_layers": 5}, 1),
}
INFER_TINY = {"anatpaste_classifier": {"hparams#head_dims": [512, 16], "hparams#image_size": 64},
              "sagan": {"hparams#sagan_channels": 4, "hparams#sagan_res_blocks": 1, "hparams#image_size": 32}}


def train_files(family: str) -> list[str]:
    return [str(CONFIGS / "train.json"), TINY, str(CONFIGS / "methods" / FAMILIES[family][0])]


def infer_files(family: str) -> list[str]:
    return [str(CONFIGS / "inference.json"), TINY, str(CONFIGS / "methods" / "inference" / f"{family}.json")]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from scripts.data.phantoms import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo_families")
    generate_demo_dataset(root, n_train=8, n_test_healthy=3, n_test_diseased=3, size=64, seed=1, n_unlabelled=4)
    return root


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory, demo_dir):
    family = request.param
    root = tmp_path_factory.mktemp(f"bundle_{family}")
    wf = make_workflow(train_files(family), "train", bundle_root=str(root), dataset_dir=str(demo_dir),
                       **FAMILIES[family][1])
    res = run_workflow(wf, watch_trainer=True)
    res.family, res.root, res.demo = family, root, demo_dir
    res.n_train = len(wf.parser.get_parsed_content("data_split")[0])
    res.batch_size = wf.parser.get_parsed_content("hparams#batch_size")
    return res


def family_network(family: str, state_dict=None, **override):
    net = make_parser(train_files(family), **{**FAMILIES[family][1], **override}).get_parsed_content("network_def")
    if state_dict is not None:
        net.load_state_dict(state_dict)
    return net.eval()


def test_training_writes_weights_and_logs_terms(trained):
    assert not trained.missing, trained.missing
    assert trained.seen["epochs"] == [1]
    sd = torch.load(trained.root / "models" / "model.pt", map_location="cpu", weights_only=True)
    net = family_network(trained.family, sd)  # strict load into a freshly built network
    ckpt = torch.load(trained.root / "models" / "train_checkpoint_epoch=1.pt", map_location="cpu",
                      weights_only=False)
    params = json.loads((trained.root / "output" / "params.json").read_text())
    assert params["method"] == trained.family
    if trained.family == "anatpaste_classifier":
        assert net.density.fitted, "model.pt holds the density fitted after training"
        assert net.density.bank.shape[0] == trained.n_train  # KDE on the clean training normals
        assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(ckpt)
        assert params["loss_name"] == "ce" and params["density"] == "kde"
    else:
        assert {"model", "optimizer", "discriminator", "d_optimizer", "trainer"} <= set(ckpt)
        assert params["loss_name"] == "wgan_gp" and params["n_critic"] == 2
    terms = trained.trainer.state.output["terms"]
    expected = {"loss", "accuracy"} if trained.family == "anatpaste_classifier" else \
        {"loss", "g_adv", "g_id", "g_rec", "d_loss", "d_wasserstein", "gp"}
    assert set(terms) == expected and all(math.isfinite(v) for v in terms.values())
    grid = cv2.imread(str(trained.root / "output" / "samples.png"), cv2.IMREAD_UNCHANGED)
    assert grid is not None and grid.shape[1] == 4 * params["image_size"]


def test_evaluation_reports_auroc_ap_dice(trained, tmp_path):
    files = train_files(trained.family) + [str(CONFIGS / "evaluate.json")]
    wf = make_workflow(files, "eval", bundle_root=str(trained.root), dataset_dir=str(trained.demo),
                       eval_dir=str(tmp_path), **FAMILIES[trained.family][1])
    res = run_workflow(wf)
    assert not res.missing, res.missing
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert m["n_images"] == 6 and m["n_with_mask"] == 3
    # the evaluation names its training run, also after the classifier's density fit rewrote model.pt
    ckpt = torch.load(trained.root / "models" / "train_checkpoint_epoch=1.pt", map_location="cpu",
                      weights_only=False)
    assert ckpt["run"]["mlflow_run_id"]
    assert res.wf.parser.get_parsed_content("train_run_id") == ckpt["run"]["mlflow_run_id"]
    for k in ("auroc", "ap", "dice_micro", "dice_mean"):
        assert 0.0 <= m[k] <= 1.0, (k, m[k])


@pytest.fixture(scope="module")
def png_and_dicom(tmp_path_factory):
    """One phantom as PNG and as DICOM: the same picture after loading, so the same score."""
    from scripts.data.phantoms import make_phantom

    folder = tmp_path_factory.mktemp("family_in")
    img, _, _ = make_phantom(np.random.default_rng(3), size=96, lesions=1)
    img = ((img.astype(np.float32) - img.min()) / float(img.max() - img.min()) * 255 + 0.5).astype(np.uint8)
    cv2.imwrite(str(folder / "cxr_png.png"), img)
    write_dicom(folder / "cxr_dcm.dcm", img.astype(np.uint16) * 16, slope=1.0, intercept=0.0)
    return folder


def test_inference_on_png_and_dicom(trained, png_and_dicom, tmp_path):
    wf = make_workflow(infer_files(trained.family), "infer", bundle_root=str(trained.root),
                       dataset_dir=str(png_and_dicom), output_dir=str(tmp_path), **INFER_TINY[trained.family])
    res = run_workflow(wf)
    assert not res.missing, res.missing
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert sorted(r["output"] for r in rows) == ["cxr_dcm", "cxr_png"]
    scores = [float(r["score"]) for r in rows]
    assert all(np.isfinite(scores))
    assert scores[0] == pytest.approx(scores[1], rel=1e-4, abs=1e-4), "PNG and DICOM of one picture agree"
    assert len(list(tmp_path.glob("*_overlay.png"))) == 2


def test_ckpt_export_torchscript_matches_checkpoint(trained, tmp_path):
    from monai.bundle import ckpt_export

    ts_path = tmp_path / "model.ts"
    ckpt = trained.root / "models" / "model.pt"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(ckpt), meta_file=META,
                config_file=train_files(trained.family), bundle_root=str(trained.root),
                **FAMILIES[trained.family][1])
    ts = torch.jit.load(str(ts_path), map_location="cpu")
    net = family_network(trained.family, torch.load(ckpt, map_location="cpu", weights_only=True))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), rtol=0, atol=1e-5)
        if trained.family == "anatpaste_classifier":  # the exported model carries the image score too
            torch.testing.assert_close(ts.score(x), net.score(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_verify_net_in_out(family):
    from monai.bundle import verify_net_in_out

    channels = FAMILIES[family][2]
    verify_net_in_out(net_id="network_def", meta_file=META, config_file=train_files(family), device="cpu",
                      **{"_meta_#network_data_format#outputs#pred#num_channels": channels},
                      **FAMILIES[family][1])


def test_gan_training_resumes_after_interruption(tmp_path, demo_dir):
    """A SAGAN run stopped in epoch 2 resumes there: generator, critic and both optimizers restored."""
    from ignite.engine import Events

    files, tiny = train_files("sagan"), {**FAMILIES["sagan"][1], "hparams#max_epochs": 2}

    class Stop(RuntimeError):
        pass

    wf = make_workflow(files, "train", bundle_root=str(tmp_path), dataset_dir=str(demo_dir), **tiny)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")

    def interrupt(engine):
        if engine.state.epoch == 2:
            raise Stop("killed in epoch 2")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, interrupt)
    with pytest.raises(Exception) as excinfo:
        wf.run()
    assert any(isinstance(e, Stop) for e in error_chain(excinfo.value))
    assert sorted(p.name for p in (tmp_path / "models").glob("train_checkpoint*")) == ["train_checkpoint_epoch=1.pt"]

    res = run_workflow(make_workflow(files, "train", bundle_root=str(tmp_path), dataset_dir=str(demo_dir),
                                     resume=True, **tiny), watch_trainer=True)
    per_epoch = math.ceil(res.wf.parser.get_parsed_content("data_split")[0].__len__() / 2)
    assert res.seen == {"epochs": [2], "iterations": per_epoch}, "only epoch 2 runs after resuming"
    d_opt = res.wf.parser.get_parsed_content("d_optimizer")
    g_opt = res.wf.parser.get_parsed_content("optimizer")
    n_critic = res.wf.parser.get_parsed_content("hparams#n_critic")
    assert {int(s["step"]) for s in g_opt.state.values()} == {2 * per_epoch}
    assert {int(s["step"]) for s in d_opt.state.values()} == {2 * per_epoch * n_critic}


def test_unlabelled_pool_comes_from_the_training_side(tmp_path, demo_dir):
    """SAGAN's x_u are the dataset's train/unlabelled images (never test images); a missing pool is a clear error."""
    parser = make_parser(train_files("sagan"), dataset_dir=str(demo_dir), **FAMILIES["sagan"][1])
    pool = parser.get_parsed_content("unlabelled_pool")
    files = [Path(i["image"]) for i in pool.items]
    assert len(files) == 4 and all(p.parent == demo_dir / "train" / "unlabelled" for p in files)
    empty = tmp_path / "empty"
    shutil.copytree(demo_dir / "train" / "healthy", empty / "train" / "healthy")
    parser = make_parser(train_files("sagan"), dataset_dir=str(demo_dir), unlabelled_dir=str(empty / "train"))
    with pytest.raises(Exception) as excinfo:
        parser.get_parsed_content("unlabelled_pool")
    assert any("no unlabelled images" in str(e) for e in error_chain(excinfo.value))
