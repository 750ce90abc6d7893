"""Export after any override: training records what ``model.pt`` needs (``models/model_config.json``) and the
documented export (``python -m scripts.cli.export``, no override arguments) rebuilds the network from it.

The model is trained like the README quick start (``configs/overrides/demo.json``: a smaller U-Net), with the
paper's intensity scaling (``configs/overrides/minmax.json``) and command-line values (64 px, 1 epoch), so that
neither ``configs/inference.json`` alone nor the override files alone describe it. A model without its record is
one clear error line that names the override file it fits, and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.bundle.test_workflows import META, make_parser, make_workflow, run_workflow
from tests.helpers import CONFIGS, REPO

TRAIN = [str(CONFIGS / "train.json"), str(CONFIGS / "overrides" / "demo.json"),
         str(CONFIGS / "overrides" / "minmax.json")]
CLI_OVERRIDES = {"hparams#max_epochs": 1, "hparams#image_size": 64, "hparams#batch_size": 2,
                 "hparams#val_fraction": 0.25, "num_workers": 0, "progress_bar": False}


def export_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """``python -m scripts.cli.export ...`` as documented, from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "scripts.cli.export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def trained_network(ckpt: Path):
    """The network of the training configs with ``ckpt`` loaded strictly."""
    net = make_parser(TRAIN, **CLI_OVERRIDES).get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("export_bundle")
    run_workflow(make_workflow(TRAIN, "train", bundle_root=str(root), dataset_dir=str(demo_dir), **CLI_OVERRIDES))
    models = root / "models"
    return SimpleNamespace(root=root, ckpt=models / "model.pt", record=models / "model_config.json")


def test_training_records_the_network_and_intensity_it_used(trained):
    record = json.loads(trained.record.read_text())
    assert record["+hparams"]["network_channels"] == [16, 32, 64, 128]  # demo.json
    assert record["+hparams"]["image_size"] == 64  # the command line's value
    assert record["intensity_transforms"] == []  # minmax.json
    assert record["trained_with"]["intensity_from"] == "configs/overrides/minmax.json"
    assert "network_def" not in record  # inference.json's U-Net
    # the record is an override of inference.json: the same network (strict load) and intensity transforms
    parser = make_parser([str(CONFIGS / "inference.json"), str(trained.record)])
    parser.get_parsed_content("network_def").load_state_dict(torch.load(trained.ckpt, weights_only=True))
    assert parser.get_parsed_content("intensity_transforms") == []


def test_documented_export_needs_no_override_arguments(trained):
    proc = export_cli("--bundle_root", str(trained.root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ts_path = trained.root / "models" / "model.ts"
    assert f"wrote {ts_path}" in proc.stdout and "model.ts == model.pt" in proc.stdout
    assert not [p for p in ts_path.parent.iterdir() if p.name.startswith(".")], "a temporary file was left"

    extra = {"metadata.json": "", "inference.json": "", "model_config.json": ""}
    ts = torch.jit.load(str(ts_path), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["model_config.json"]) == json.loads(trained.record.read_text())
    assert json.loads(extra["inference.json"]) == json.loads((CONFIGS / "inference.json").read_text())
    assert json.loads(extra["metadata.json"])["version"] == json.loads(Path(META).read_text())["version"]
    net = trained_network(trained.ckpt)
    torch.manual_seed(0)
    for shape in ((2, 1, 64, 64), (1, 1, 128, 128)):
        x = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(ts(x), net(x), rtol=0, atol=1e-5)


def test_weights_without_their_record_are_one_clear_error(tmp_path, trained):
    from scripts.cli.export import main

    (tmp_path / "models").mkdir()
    shutil.copy2(trained.ckpt, tmp_path / "models" / "model.pt")
    proc = export_cli("--bundle_root", str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]  # (+ warnings of installed packages)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("error: model.pt does not fit the network of configs/inference.json "
                                "(no models/model_config.json"), errors
    assert "pass --config_file configs/overrides/demo.json" in errors[0]
    assert "first difference: 'model.0.conv.unit0.conv.weight': [16, 1, 3, 3] in the weights" in errors[0]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"], "nothing is written"
    # with the named file the same weights export (in-process: the same main)
    assert main(["--bundle_root", str(tmp_path), "--config_file", str(CONFIGS / "overrides" / "demo.json")]) == 0
    assert (tmp_path / "models" / "model.ts").is_file()


def test_intensity_transforms_of_no_config_file_are_asked_for(tmp_path, trained, capsys):
    from monai.transforms import ScaleIntensityRanged

    from scripts.cli.export import main
    from scripts.tracking import model_record

    hparams = make_parser(TRAIN, **CLI_OVERRIDES).get_parsed_content("hparams")
    custom = [ScaleIntensityRanged(keys="image", a_min=0.1, a_max=0.9, b_min=0.0, b_max=1.0, clip=True)]
    record = model_record(hparams, trained_network(trained.ckpt), custom)
    assert "intensity_transforms" not in record
    assert record["trained_with"]["intensity_transforms"] == ["ScaleIntensityRanged"]
    (tmp_path / "models").mkdir()
    shutil.copy2(trained.ckpt, tmp_path / "models" / "model.pt")
    (tmp_path / "models" / "model_config.json").write_text(json.dumps(record))
    assert main(["--bundle_root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the training's intensity_transforms ['ScaleIntensityRanged'] are not those of a "
                          "file of configs/") and "pass the override file that sets intensity_transforms" in err
    own = tmp_path / "scaled.json"
    own.write_text(json.dumps({"intensity_transforms": [{"_target_": "ScaleIntensityRanged", "keys": "image",
                                                         "a_min": 0.1, "a_max": 0.9, "b_min": 0.0, "b_max": 1.0,
                                                         "clip": True}]}))
    assert main(["--bundle_root", str(tmp_path), "--config_file", str(own)]) == 0
