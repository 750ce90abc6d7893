"""The packed bundle zip (``python -m scripts.cli.pack_bundle``) works on its own, outside this repository.

A tiny bundle is trained once (``configs/train.json`` + ``tests/configs/tiny.json`` on a few demo phantoms),
packed with the record training wrote (``models/model_config.json``, no ``--config_file``), fetched with
``monai.bundle.download`` from a ``file://`` URL into a temporary folder outside the repository, and used from
subprocesses that cannot import this repository's code: the venv's editable install of the project is taken out
of ``sys.meta_path`` and ``PYTHONPATH`` does not name the repository, and every loaded
``scripts``/``custom_transforms`` module is checked to come from the bundle.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import REPO

CONFIGS = REPO / "configs"
TINY = REPO / "tests" / "configs" / "tiny.json"
NAME = "art_asyn_bundle"

# run first in every subprocess: no access to this repository's code, and a check that none was used
PRELUDE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    # the venv holds the project as an editable install: drop its finder, as on a machine without the project
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    BUNDLE = Path(os.environ["BUNDLE_UNDER_TEST"]).resolve()

    def check_own_code():
        mods = {n: m for n, m in sys.modules.items() if n.split(".")[0] in ("scripts", "custom_transforms")}
        assert {"scripts", "custom_transforms"} <= set(mods), sorted(mods)
        outside = {n: getattr(m, "__file__", None) for n, m in mods.items()
                   if not Path(getattr(m, "__file__", None) or "/").resolve().is_relative_to(BUNDLE)}
        assert not outside, f"modules imported from outside the bundle: {outside}"
        print("OWN_CODE_OK", len(mods), "modules from", BUNDLE)
""")

# `python -m monai.bundle ...` with the prelude first
CLI_DRIVER = PRELUDE + textwrap.dedent("""
    import runpy

    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    check_own_code()
""")

# the Model Zoo checks, run in the bundle folder with paths relative to it
CHECKS_DRIVER = PRELUDE + textwrap.dedent("""
    import urllib.request

    import monai.apps.utils

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monai.apps.utils._download_with_progress = refuse
    urllib.request.urlretrieve = urllib.request.urlopen = refuse

    import torch
    from monai.bundle import ConfigParser, load, verify_metadata, verify_net_in_out

    configs = sys.argv[1:]
    meta = json.loads(Path("configs/metadata.json").read_text())
    verify_metadata(meta_file="configs/metadata.json", filepath="configs/schema/meta_schema.json")
    verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file=configs, device="cpu")

    # model.ts through MONAI's loader (torch.jit.load with the embedded files)
    names = [Path(c).name for c in configs]
    ts, ts_meta, extra = load(name=BUNDLE.name, bundle_dir=str(BUNDLE.parent), load_ts_module=True,
                              config_files=names, device="cpu")
    assert isinstance(ts, torch.jit.ScriptModule), type(ts)
    assert ts_meta["version"] == meta["version"], ts_meta.get("version")
    assert ts_meta["network_data_format"] == meta["network_data_format"]
    for c, n in zip(configs, names):
        assert json.loads(extra[n]) == json.loads(Path(c).read_text()), f"{n} embedded in model.ts differs from {c}"

    parser = ConfigParser()
    parser.read_config(configs)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load("models/model.pt", map_location="cpu", weights_only=True))  # strict
    net.eval()
    torch.manual_seed(0)
    for shape in ((2, 1, 64, 64), (1, 1, 96, 96)):
        x = torch.rand(shape)
        with torch.no_grad():
            torch.testing.assert_close(ts(x), net(x), rtol=0, atol=1e-5)
    check_own_code()
    print("CHECKS_OK")
""")


def run_isolated(code: str, args, cwd: Path, bundle: Path, pythonpath: str | None = None):
    """``python -c code args`` in ``cwd`` without this repository on PYTHONPATH (``pythonpath`` only, if given)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MLFLOW_TRACKING_URI")}
    env.update(BUNDLE_UNDER_TEST=str(bundle), OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "OWN_CODE_OK" in proc.stdout, proc.stdout[-3000:]
    return proc


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def packed(tmp_path_factory, demo_dir):
    """The tiny bundle trained for one epoch (in ``root``), packed with its record (no --config_file) into ``zip``."""
    from monai.bundle import ConfigWorkflow

    from scripts.cli.pack_bundle import main

    root = tmp_path_factory.mktemp("pkg_bundle")
    wf = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(TINY)], workflow_type="train",
                        meta_file=str(CONFIGS / "metadata.json"), logging_file=False, bundle_root=str(root),
                        dataset_dir=str(demo_dir))
    wf.initialize()
    wf.run()
    wf.finalize()
    assert (root / "models" / "model.pt").is_file()

    out = tmp_path_factory.mktemp("pkg_dist") / f"{NAME}.zip"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["--bundle_root", str(root), "--out", str(out)])
    assert rc == 0 and out.is_file()
    return SimpleNamespace(zip=out, stdout=stdout.getvalue(), root=root)


@pytest.fixture(scope="module")
def unzipped(tmp_path_factory, packed):
    """The zip fetched as a user would: ``monai.bundle.download`` (``file://`` URL), outside the repository."""
    from monai.bundle import download

    folder = tmp_path_factory.mktemp("pkg_user")
    assert not folder.resolve().is_relative_to(REPO.resolve())
    with warnings.catch_warnings():  # MONAI's download has no hash argument for a bundle zip
        warnings.filterwarnings("ignore", "No hash value provided")
        download(name=NAME, url=packed.zip.resolve().as_uri(), bundle_dir=str(folder), progress=False)
    bundle = folder / NAME
    assert (bundle / "configs" / "inference.json").is_file()
    return bundle


# ------------------------------------------------------------------------------------------- tests

def test_zip_layout_and_summary(packed):
    out, stdout = packed.zip, packed.stdout
    with zipfile.ZipFile(out) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        assert all(n.startswith(f"{NAME}/") for n in names), "one top folder"
        rel = {n[len(NAME) + 1:] for n in names}
        hashes = {p: hashlib.sha256(z.read(f"{NAME}/{p}")).hexdigest() for p in ("models/model.pt", "models/model.ts")}
        large = yaml.safe_load(z.read(f"{NAME}/large_files.yml"))
    expected = {"LICENSE", "large_files.yml", "models/model.pt", "models/model.ts", "configs/model_config.json",
                "models/model_config.json",
                "docs/README.md", "docs/package.md", "configs/schema/meta_schema.json"}
    expected |= {p.relative_to(REPO).as_posix() for p in CONFIGS.rglob("*") if p.is_file()}
    for pkg in ("custom_transforms", "scripts"):  # every source file, nothing compiled
        expected |= {p.relative_to(REPO).as_posix() for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"app/{n}" for n in ("__main__.py", "app.py", "app.yaml", "requirements.txt")}  # the Deploy app
    assert expected <= rel, sorted(expected - rel)
    assert not [n for n in rel if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert not [n for n in rel if n.split("/")[0] in ("tests", "output", "demo_data", ".venv")]
    assert {e["path"]: e["hash_val"] for e in large["large_files"]} == hashes
    assert f"wrote {out}" in stdout and "model.ts == model.pt" in stdout and "configs/model_config.json" in stdout
    assert "configs/tiny.json" not in rel, "the record, not the training's override file, goes with the model"


def test_inference_from_another_folder(unzipped, demo_dir):
    """(a) the documented CLI from outside the bundle: PYTHONPATH=<bundle>, --bundle_root <bundle>."""
    png = sorted((demo_dir / "test" / "diseased").glob("*.png"))[0]
    configs = [str(unzipped / "configs" / "inference.json"), str(unzipped / "configs" / "model_config.json")]
    run_isolated(CLI_DRIVER, ["run", "inferring", "--config_file", repr(configs), "--bundle_root", unzipped,
                              "--dataset_dir", png], cwd=unzipped.parent, bundle=unzipped,
                 pythonpath=str(unzipped))
    out = unzipped / "output" / "inference"  # default output_dir: under bundle_root
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [(r["file"], r["status"]) for r in rows] == [(str(png), "ok")]
    assert float(rows[0]["score"]) >= 0 and 0.0 <= float(rows[0]["mask_fraction"]) <= 1.0
    assert (out / f"{png.stem}_overlay.png").is_file() and (out / f"{png.stem}_amap.nii.gz").is_file()


# the Deploy app of the zip (``python app -i ... -o ... -m models/model.ts``) with the prelude first
APP_DRIVER = PRELUDE + textwrap.dedent("""
    import runpy

    sys.argv = [str(BUNDLE / "app"), *sys.argv[1:]]
    try:
        runpy.run_path(str(BUNDLE / "app"), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), f"the app exited with {e.code}"
    check_own_code()
""")


def test_deploy_app_from_the_zip(unzipped, demo_dir, tmp_path):
    """(a') the zip's MONAI Deploy app on a PNG, with the zip's model.ts and code only."""
    pytest.importorskip("monai.deploy", reason="the MONAI Deploy SDK is not installed (pip install -e '.[deploy]')")
    png = sorted((demo_dir / "test" / "diseased").glob("*.png"))[0]
    out = tmp_path / "deploy"
    proc = run_isolated(APP_DRIVER, ["-i", png, "-o", out, "-m", unzipped / "models" / "model.ts"], cwd=unzipped,
                        bundle=unzipped, pythonpath=str(unzipped))
    assert "deploy: 1 radiographs: 1 written" in proc.stdout
    result = json.loads((out / png.stem / "result.json").read_text())
    assert result["kind"] == "file" and result["score"] >= 0


def test_model_zoo_checks_in_the_bundle(unzipped):
    """(b) verify_metadata (offline), verify_net_in_out, model.ts (embedded configs) == model.pt's network."""
    proc = run_isolated(CHECKS_DRIVER, ["configs/inference.json", "configs/model_config.json"], cwd=unzipped,
                        bundle=unzipped)
    assert "CHECKS_OK" in proc.stdout


@pytest.mark.filterwarnings("ignore:tqdm is not installed")
def test_large_files_yml_fetches_the_packed_models(tmp_path, unzipped):
    """The zip's large_files.yml (the repository's template + hashes) works with MONAI's download_large_files."""
    from monai.bundle import download_large_files

    spec = yaml.safe_load((unzipped / "large_files.yml").read_text())
    template = yaml.safe_load((REPO / "large_files.yml").read_text())
    assert [e["path"] for e in spec["large_files"]] == [e["path"] for e in template["large_files"]]
    assert {e["path"] for e in spec["large_files"]} == {"models/model.pt", "models/model.ts"}
    for e in spec["large_files"]:  # as if published: the unzipped files stand in for the URLs
        e["url"] = (unzipped / e["path"]).resolve().as_uri()
    (tmp_path / "large_files.yml").write_text(yaml.safe_dump(spec))
    download_large_files(bundle_path=str(tmp_path))  # checks each hash_val
    for e in spec["large_files"]:
        assert (tmp_path / e["path"]).read_bytes() == (unzipped / e["path"]).read_bytes()


def test_clear_errors(tmp_path, capsys, packed):
    from scripts.cli.pack_bundle import main

    out = tmp_path / "dist" / f"{NAME}.zip"
    assert main(["--bundle_root", str(tmp_path), "--out", str(out)]) == 2
    assert "model.pt does not exist" in capsys.readouterr().err
    missing = tmp_path / "overrides_it_was_trained_with.json"
    assert main(["--bundle_root", str(packed.root), "--out", str(out), "--config_file", str(missing)]) == 2
    assert f"config file {missing} does not exist" in capsys.readouterr().err
    # the tiny model without its record nor its override: the default network does not fit, one line says so
    bare = tmp_path / "bare"
    (bare / "models").mkdir(parents=True)
    (bare / "models" / "model.pt").write_bytes((packed.root / "models" / "model.pt").read_bytes())
    assert main(["--bundle_root", str(bare), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: model.pt does not fit the network of configs/inference.json")
    assert "no models/model_config.json" in err and "no override file of configs/ gives that network" in err
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"not a checkpoint")
    assert main(["--bundle_root", str(tmp_path), "--out", str(out)]) == 2
    assert "model.pt is not a readable weights file" in capsys.readouterr().err
    assert not out.parent.exists(), "nothing is written when packing fails"
    # a model without a record packs with the override files it was trained with
    assert main(["--bundle_root", str(bare), "--out", str(out), "--config_file", str(TINY)]) == 0
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
    assert f"{NAME}/configs/tiny.json" in names and f"{NAME}/configs/model_config.json" not in names
