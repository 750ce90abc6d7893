"""The MONAI Deploy application (``bundle/app``) run as users run it, on CPU.

A tiny U-Net (``tests/configs/tiny.json``, seeded random weights: the tests check plumbing and equality, not
accuracy) is exported with ``ckpt_export`` and run by ``python bundle/app -i ... -o ... -m ...`` on a DICOM study
written by the tests (a MONOCHROME1 CR, a DX with a VOI LUT, and what the app must leave out: a lateral view, a
CT series, a knee, an instance without pixel data) and on PNG files. The DICOM SEG, SC and SR read back with
pydicom and highdicom, reference their source instance, and the SEG's mask and the report's score equal those of
``configs/inference.json`` on the same files. The SDK's ``MonaiBundleInferenceOperator`` also loads a bundle
folder (``model.pt`` + configs, and ``model.ts``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai.deploy", reason="the MONAI Deploy SDK is not installed (pip install -e '.[deploy]')")
pytest.importorskip("highdicom", reason="highdicom is not installed (pip install -e '.[deploy]')")

from tests.helpers import REPO, random_model  # noqa: E402

pytestmark = pytest.mark.deploy

CONFIGS = REPO / "configs"
TINY = REPO / "tests" / "configs" / "tiny.json"
INFER = [str(CONFIGS / "inference.json"), str(TINY)]
APP = REPO / "bundle" / "app"
GOOD = ("cr_mono1", "dx_voilut")  # the two radiographs the app must process


def run_app(inp, out, model, env_extra=None, timeout=300):
    """``python bundle/app -i inp -o out -m model`` in a subprocess; the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, str(APP), "-i", str(inp), "-o", str(out), "-m", str(model)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(out.parent))


def _phantom(seed: int, size: int = 96) -> np.ndarray:
    from scripts.data.phantoms import make_phantom

    img, _, _ = make_phantom(np.random.default_rng(seed), size=size, lesions=1)
    img = img.astype(np.float64)
    return (img - img.min()) / (img.max() - img.min())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A bundle folder with the tiny network's model.pt and model.ts from the documented export
    (``scripts.cli.export``: inference.json, tiny.json and metadata.json embedded)."""
    import zipfile

    from scripts.cli.export import export

    root = random_model(tmp_path_factory.mktemp("deploy_bundle"), INFER, seed=0)
    export(root, config_file=[str(TINY)])
    # the SDK finds the embedded configs under "<file stem>/extra/": the archive's root must be the file's stem
    assert {n.split("/")[0] for n in zipfile.ZipFile(root / "models" / "model.ts").namelist()} == {"model"}
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One study, six series: two good radiographs and four the app must leave out."""
    from pydicom.uid import generate_uid

    from scripts.deploy.sample_dicom import write_cxr_dicom

    folder = tmp_path_factory.mktemp("study")
    uid = generate_uid()
    sops = {
        "cr_mono1": write_cxr_dicom(folder / "cr_mono1.dcm", _phantom(1), study_uid=uid, photometric="MONOCHROME1",
                                    series_number=1),
        "dx_voilut": write_cxr_dicom(folder / "sub" / "dx_voilut.dcm", _phantom(2, 80), study_uid=uid,
                                     modality="DX", voi_lut=True, series_number=2),
        "lateral": write_cxr_dicom(folder / "lateral.dcm", _phantom(3), study_uid=uid, modality="DX", view="LL",
                                   series_number=3),
        "ct": write_cxr_dicom(folder / "ct.dcm", _phantom(4), study_uid=uid, modality="CT", body_part="ABDOMEN",
                              series_number=4),
        "knee": write_cxr_dicom(folder / "knee.dcm", _phantom(5), study_uid=uid, body_part="KNEE", series_number=5),
        "no_pixels": write_cxr_dicom(folder / "no_pixels.dcm", None, study_uid=uid, series_number=6),
    }
    return folder, sops


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, model, study):
    out = tmp_path_factory.mktemp("deploy_out") / "out"
    res = run_app(study[0], out, model / "models" / "model.ts")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res.out = out
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model, study):
    """configs/inference.json (+ tiny) on the two good DICOM files: {name: (mask at model size, score)}."""
    import nibabel as nib
    from monai.bundle import ConfigWorkflow

    inp = tmp_path_factory.mktemp("ref_in")
    for name in GOOD:
        src = next(study[0].rglob(f"{name}.dcm"))
        shutil.copy(src, inp / src.name)
    out = tmp_path_factory.mktemp("ref_out")
    wf = ConfigWorkflow(config_file=INFER, workflow_type="infer", meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, bundle_root=str(model), dataset_dir=str(inp), output_dir=str(out),
                        progress_bar=False)
    wf.initialize()
    wf.run()
    wf.finalize()
    ref = {}
    for row in csv.DictReader(open(out / "scores.csv")):
        mask = np.asarray(nib.load(str(out / f"{row['output']}_mask.nii.gz")).dataobj).T  # NIfTI is (x, y)
        ref[Path(row["file"]).stem] = (mask.astype(np.float32), float(row["score"]))
    assert set(ref) == set(GOOD)
    return ref


def _folder(dicom_run, sop: str) -> Path:
    return dicom_run.out / sop


def test_only_frontal_chest_radiographs_get_outputs(dicom_run, study):
    _, sops = study
    made = {p.name for p in dicom_run.out.iterdir() if p.is_dir()}
    assert made == {sops[n] for n in GOOD}
    log = dicom_run.stdout + dicom_run.stderr
    assert "view position LL is lateral" in log
    assert "modality CT is not one of CR/DX" in log
    assert "body part KNEE is not the chest" in log
    assert f"SOP {sops['no_pixels']} (no_pixels.dcm): skipped: no pixel data" in log
    assert f"deploy: 6 radiographs: 2 written, 4 skipped, 0 failed -> {dicom_run.out}" in dicom_run.stdout
    assert "Traceback" not in log


def test_seg_references_source_and_equals_inference_json_mask(dicom_run, study, reference):
    import highdicom as hd
    import pydicom

    from custom_transforms.io import resize

    folder, sops = study
    for name in GOOD:
        src = pydicom.dcmread(next(folder.rglob(f"{name}.dcm")))
        seg = hd.seg.segread(_folder(dicom_run, sops[name]) / "seg.dcm")
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
        assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID
        ref_sops = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                    for i in s.ReferencedInstanceSequence}
        assert ref_sops == {src.SOPInstanceUID}
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[src.SOPInstanceUID],
                                                   segment_numbers=[1], assert_missing_frames_are_empty=True)
        seg_mask = np.asarray(pixels)[0, ..., 0]
        assert seg_mask.shape == (src.Rows, src.Columns)
        ref_mask, _ = reference[name]
        expected = resize(ref_mask, (src.Rows, src.Columns), nearest=True)
        np.testing.assert_array_equal(seg_mask.astype(np.float32), expected)
        assert 0 < expected.mean() < 1  # a real mask, not a trivially empty or full one


def test_sc_and_sr_reference_source_and_carry_the_score(dicom_run, study, reference):
    import pydicom

    folder, sops = study
    for name in GOOD:
        src = pydicom.dcmread(next(folder.rglob(f"{name}.dcm")))
        out = _folder(dicom_run, sops[name])
        result = json.loads((out / "result.json").read_text())
        assert result["score"] == pytest.approx(reference[name][1], rel=1e-5)
        assert result["source_sop_instance_uid"] == src.SOPInstanceUID

        sc = pydicom.dcmread(out / "sc.dcm")
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
        assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.ndim == 3
        assert sc.pixel_array.shape[1] == src.Columns  # the source's width (under the 1024 px cap)
        assert sc.SeriesInstanceUID != src.SeriesInstanceUID

        sr = pydicom.dcmread(out / "sr.dcm")
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
        assert float(items["Anomaly score"].MeasuredValueSequence[0].NumericValue) == pytest.approx(
            reference[name][1], rel=1e-5)
        assert "no score threshold" in items["Finding"].TextValue
        assert items["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            src.SOPInstanceUID
        assert (out / "overlay.png").is_file() and (out / "mask.png").is_file()


def test_threshold_from_environment_reaches_the_report(tmp_path, model, study):
    import pydicom

    folder, sops = study
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(folder / "cr_mono1.dcm", one / "cr_mono1.dcm")
    res = run_app(one, tmp_path / "out", model / "models" / "model.ts", {"ART_ASYN_SCORE_THRESHOLD": "1e-9"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "out" / sops["cr_mono1"]
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in pydicom.dcmread(out / "sr.dcm").ContentSequence}
    assert float(items["Anomaly score threshold"].MeasuredValueSequence[0].NumericValue) == pytest.approx(1e-9)
    assert items["Finding"].TextValue.startswith("anomalous")
    assert json.loads((out / "result.json").read_text())["above_threshold"] is True


def test_png_input_writes_json_and_png_only(tmp_path, model):
    import cv2

    inp = tmp_path / "pngs"
    inp.mkdir()
    for i in range(2):
        cv2.imwrite(str(inp / f"cxr{i}.png"), (_phantom(10 + i) * 255).astype(np.uint8))
    cv2.imwrite(str(inp / "cxr0.jpg"), (_phantom(12) * 255).astype(np.uint8))  # same stem: its own folder
    (inp / "notes.txt").write_text("not an image")
    res = run_app(inp, tmp_path / "out", model / "models" / "model.ts")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cxr0", "cxr0_png", "cxr1"]  # cxr0.jpg comes first
    for d in (tmp_path / "out").iterdir():
        assert sorted(p.name for p in d.iterdir()) == ["mask.png", "overlay.png", "result.json"]
        assert json.loads((d / "result.json").read_text())["kind"] == "file"
    assert "notes.txt: ignored" in res.stdout + res.stderr
    assert "deploy: 3 radiographs: 3 written" in res.stdout


@pytest.mark.parametrize("keep", ["model.pt", "model.ts"])
def test_bundle_folder_loads_through_the_sdk(tmp_path, keep):
    """``-m <bundle folder>``: the SDK reads configs/inference.json + metadata.json and models/<keep>."""
    root = tmp_path / "bundle"
    shutil.copytree(CONFIGS, root / "configs")
    random_model(root, CONFIGS / "inference.json", seed=1, export=keep == "model.ts")  # the default 256 px network
    if keep == "model.ts":
        (root / "models" / "model.pt").unlink()
    import cv2

    inp = tmp_path / "in"
    inp.mkdir()
    cv2.imwrite(str(inp / "a.png"), (_phantom(20, 128) * 255).astype(np.uint8))
    res = run_app(inp, tmp_path / "out", root)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "a" / "result.json").read_text())
    assert "at 256 px" in result["mask_rule"] and np.isfinite(result["score"])


def test_bad_model_and_unreadable_inputs(tmp_path, model):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    res = run_app(inp, tmp_path / "out", model / "models" / "model.ts")
    assert res.returncode == 1, "inputs found but nothing written: exit status 1"
    assert "broken.png: skipped:" in res.stdout + res.stderr
    assert "deploy: 1 radiographs: 0 written, 1 skipped" in res.stdout

    res = run_app(inp, tmp_path / "out2", model / "models" / "model.pt")
    assert res.returncode == 2
    assert "is not a TorchScript file" in res.stderr and "Traceback" not in res.stderr

    res = run_app(inp, inp / "results", model / "models" / "model.ts")
    assert res.returncode == 2 and "is inside the input folder" in res.stderr
    assert not any((inp / "results").iterdir())  # (the SDK's argument parser creates the folder; nothing in it)


def test_model_families(tmp_path, study):
    """SAGAN's generator (a restoration network) runs; AnatPaste's classifier is refused with a clear line."""
    from scripts.cli.export import export

    small = tmp_path / "small_sagan.json"
    small.write_text(json.dumps({"+hparams": {"sagan_channels": 8, "sagan_res_blocks": 1}}))
    sagan = [str(CONFIGS / "methods" / "inference" / "sagan.json"), str(small)]
    root = random_model(tmp_path / "sagan", [str(CONFIGS / "inference.json"), *sagan], seed=0)
    export(root, config_file=sagan)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(study[0] / "cr_mono1.dcm", one / "cr_mono1.dcm")
    res = run_app(one, tmp_path / "out_sagan", root / "models" / "model.ts")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads((tmp_path / "out_sagan" / study[1]["cr_mono1"] / "result.json").read_text())
    assert "at 64 px" in result["mask_rule"] and {"seg.dcm", "sc.dcm", "sr.dcm"} <= set(result["files"])

    classifier = [str(CONFIGS / "methods" / "inference" / "anatpaste_classifier.json")]
    root = random_model(tmp_path / "classifier", [str(CONFIGS / "inference.json"), *classifier], seed=0)
    export(root, config_file=classifier)
    res = run_app(one, tmp_path / "out_classifier", root / "models" / "model.ts")
    assert res.returncode == 2
    assert "holds AnatPasteClassifier" in res.stderr and "Traceback" not in res.stderr


def test_hard_inputs_and_a_renamed_model_in_a_map_folder(tmp_path, model, study):
    """A MAP-style model folder (``<models>/<name>/<file>.ts``) holding a renamed model.ts; a study with a CR
    whose Type 2 patient/study attributes were removed (as some de-identifiers do) and a truncated file; and one
    DICOM file given as ``-i``, which takes the DICOM route with its rules."""
    import pydicom

    models = tmp_path / "models"
    (models / "cxr").mkdir(parents=True)
    shutil.copy(model / "models" / "model.ts", models / "cxr" / "renamed.ts")  # archive root "model" != "renamed"
    inp = tmp_path / "in"
    inp.mkdir()
    ds = pydicom.dcmread(study[0] / "cr_mono1.dcm")
    for k in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "ReferringPhysicianName",
              "StudyTime", "PatientOrientation"):
        delattr(ds, k)
    ds.save_as(inp / "stripped.dcm", enforce_file_format=True)
    data = (study[0] / "sub" / "dx_voilut.dcm").read_bytes()
    (inp / "truncated.dcm").write_bytes(data[:400])
    res = run_app(inp, tmp_path / "out", models)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "truncated.dcm: skipped: the SDK's DICOM loader did not use it" in log
    assert f"deploy: 2 radiographs: 1 written, 1 skipped, 0 failed -> {tmp_path / 'out'}" in res.stdout
    out = tmp_path / "out" / ds.SOPInstanceUID
    result = json.loads((out / "result.json").read_text())
    assert {"seg.dcm", "sc.dcm", "sr.dcm"} <= set(result["files"]) and "at 64 px" in result["mask_rule"]
    sc = pydicom.dcmread(out / "sc.dcm")
    assert sc.PatientOrientation in (None, "", []), "unknown in the source: left empty, not guessed"
    assert pydicom.dcmread(out / "seg.dcm").PatientSex in (None, "")

    res = run_app(study[0] / "lateral.dcm", tmp_path / "out_one", models)
    assert res.returncode == 1, "one input, not written: exit status 1"
    assert "view position LL is lateral" in res.stdout + res.stderr
    assert "deploy: 1 radiographs: 0 written, 1 skipped" in res.stdout
