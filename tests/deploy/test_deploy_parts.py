"""Parts of the Deploy app in process: burnt-in text, the writer's failure path, atomic result folders, DICOM
attributes highdicom needs."""

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="highdicom is not installed (pip install -e '.[deploy]')")

from custom_transforms.io import atomic_write_folder  # noqa: E402
from scripts.deploy import dicom_outputs as dout  # noqa: E402

pytestmark = pytest.mark.deploy


@pytest.mark.parametrize("width", [64, 96, 256, 900, 2000])
def test_burnt_in_lines_fit_the_image(width):
    import cv2

    lines = dout.summary_lines(0.012345, 0.01, "no two lungs found; looks inverted; not frontal (lateral-like)")
    fitted, scale = dout.fit_lines(lines, width, 0.7 * max(0.4, width / 900.0), thickness=1)
    assert all(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] <= width - 16 for t in fitted)
    assert " ".join(fitted).replace(" ", "") == " ".join(lines).replace(" ", ""), "nothing lost, only wrapped"
    picture = dout.burn_in(np.zeros((width, width, 3), np.uint8), lines)
    assert picture.shape[1] == width and picture.shape[0] > width


def test_result_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "1.2.3"
    atomic_write_folder(folder, {"sc.dcm": b"old", "sr.dcm": b"old"})
    atomic_write_folder(folder, {"overlay.png": b"new", "result.json": b"{}"})
    assert sorted(p.name for p in folder.iterdir()) == ["overlay.png", "result.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["1.2.3"], "no temporary folders left"


def test_type2_attributes_filled_on_a_copy_and_uids_required(tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    from scripts.deploy.sample_dicom import write_cxr_dicom

    write_cxr_dicom(tmp_path / "a.dcm", np.random.default_rng(0).random((64, 64)), study_uid=generate_uid())
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    del ds.PatientSex, ds.StudyID
    filled = dout.with_type2(ds)
    assert "PatientSex" not in ds and filled.PatientSex in (None, "") and filled.StudyID in (None, "")
    seg = dout.segmentation(ds, np.zeros((64, 64), np.float32), software_version="t")
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    del ds.SOPInstanceUID
    with pytest.raises(ValueError, match="lacks SOPInstanceUID"):
        dout.with_type2(ds)


def test_writer_counts_a_radiograph_without_model_outputs_as_failed(tmp_path):
    pytest.importorskip("monai.deploy", reason="the MONAI Deploy SDK is not installed")
    from monai.deploy.core import Application

    from scripts.deploy.operators import OUTPUT_PORTS, AnomalyResultWriterOperator

    writer = AnomalyResultWriterOperator(Application(), output_folder=tmp_path / "out", name="w")
    source = {"kind": "file", "path": "x.png", "name": "x", "dataset": None, "pixels": np.zeros((8, 8))}
    assert writer.handle(source, {p: None for p in OUTPUT_PORTS}) is None
    assert writer.counts["failed"] == 1 and not (tmp_path / "out").exists()


def test_embedded_configs_in_the_export_order(tmp_path):
    """inference, then the training's record, then other override files (the export's merge order)."""
    import importlib.util
    import zipfile

    pytest.importorskip("monai.deploy", reason="the MONAI Deploy SDK is not installed")
    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("deploy_app_under_test", REPO / "bundle" / "app" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    ts = tmp_path / "model.ts"
    with zipfile.ZipFile(ts, "w") as z:
        for name in ("code/m.py", "extra/aaa.json", "extra/metadata.json", "extra/model_config.json",
                     "extra/inference.json", "data.pkl"):
            z.writestr(f"model/{name}", "{}")
    assert app.bundle_config_names(ts) == ["inference", "model_config", "aaa"]
    renamed = tmp_path / "other.ts"
    ts.rename(renamed)
    staged = app.staged_model(renamed, tmp_path)
    assert staged.name == "model.ts" and staged.resolve() == renamed.resolve()


def test_inference_error_on_one_radiograph_sends_none_on_every_port(monkeypatch):
    pytest.importorskip("monai.deploy", reason="the MONAI Deploy SDK is not installed")
    from types import SimpleNamespace

    from monai.deploy.core import Application
    from monai.deploy.operators.monai_bundle_inference_operator import MonaiBundleInferenceOperator

    from scripts.deploy.operators import OUTPUT_PORTS, IsolatingBundleInferenceOperator

    op = IsolatingBundleInferenceOperator(Application(), app_context=SimpleNamespace(models=None), input_mapping=[],
                                          output_mapping=[], name="infer")

    def boom(self, op_input, op_output, context):
        raise RuntimeError("network failed")

    monkeypatch.setattr(MonaiBundleInferenceOperator, "compute", boom)
    sent = []
    out = SimpleNamespace(emit=lambda value, port: sent.append((port, value)))
    with pytest.raises(RuntimeError):  # before the bundle config is parsed: the app stops
        op.compute(None, out, None)
    op._init_completed = True
    op.compute(None, out, None)
    assert sent == [(p, None) for p in OUTPUT_PORTS]
