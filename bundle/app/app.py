"""ART-ASyn chest X-ray anomaly detection as a MONAI Deploy application (docs/deploy.md).

    python bundle/app -i <DICOM folder | image folder | image file> -o <output folder> -m <model.ts | bundle folder>

DICOM input: the SDK's loader, a series selector with chest radiograph rules (CR/DX; lateral views, other body
parts, instances without pixel data are logged and left out), one radiograph at a time through the SDK's
``MonaiBundleInferenceOperator`` running the bundle's ``configs/inference.json``, then per radiograph a DICOM
Segmentation, Secondary Capture and Structured Report referencing the source instance, plus JSON and PNG copies.
PNG/JPEG input (a folder without DICOM, or one file): the same, without the DICOM objects.

``-m``: a ``model.ts`` exported by ``python -m scripts.cli.pack_bundle`` or ``monai.bundle ckpt_export`` (its
embedded ``inference.json`` and override files are used), or a bundle folder (``configs/inference.json``,
``configs/metadata.json`` and ``models/model.ts`` or ``models/model.pt``). Environment: ``ART_ASYN_SCORE_THRESHOLD``
sets the report's score threshold (default: ``score_threshold`` of the bundle config, ``null`` = score only).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from holoscan.conditions import BooleanCondition, CountCondition
from monai.deploy.core import AppContext, Application, Image, IOType, ModelFactory
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.monai_bundle_inference_operator import BundleConfigNames, IOMapping, get_bundle_config

from custom_transforms.io import has_dicom_preamble, image_format
from scripts.data.datasets import scan_folder
from scripts.deploy.operators import (
    OUTPUT_PORTS,
    AnomalyResultWriterOperator,
    ChestXrayImageOperator,
    ChestXraySeriesSelectorOperator,
    IsolatingBundleInferenceOperator,
)
from scripts.inference import scan_inputs

logger = logging.getLogger("art_asyn.deploy")
THRESHOLD_ENV = "ART_ASYN_SCORE_THRESHOLD"


class DeployInputError(ValueError):
    """The model or input given to the application cannot be used; the message says why."""


def resolve_model(model_path: Path) -> Path:
    """The model to run: a bundle folder (with ``configs/inference.json``) or a ``.ts`` file as given; a folder
    holding exactly one ``*.ts`` directly or one level down (a MAP's ``/opt/holoscan/models/<name>/model.ts``)
    -> that file.

    Raises:
        DeployInputError: a folder that is neither.
    """
    if not model_path.is_dir() or (model_path / "configs" / "inference.json").is_file():
        return model_path
    found = sorted({*model_path.glob("*.ts"), *model_path.glob("*/*.ts")})
    if len(found) != 1:
        raise DeployInputError(f"model folder '{model_path}' has no configs/inference.json and {len(found)} *.ts "
                               "files (need a bundle folder, or exactly one model.ts)")
    return found[0]


def archive_root(model_ts: Path) -> str:
    """The top folder of a TorchScript archive (``torch.jit.save`` names it after the file it wrote)."""
    with zipfile.ZipFile(model_ts) as z:
        return z.namelist()[0].split("/")[0]


def staged_model(model_ts: Path, scratch: Path) -> Path:
    """``model_ts``, or a link to it named ``<archive root>.ts`` in ``scratch`` when it was renamed after export:
    the SDK reads the embedded configs only under ``<file stem>/extra/`` (and reads none otherwise)."""
    root = archive_root(model_ts)
    if root == model_ts.stem:
        return model_ts
    staged = scratch / f"{root}.ts"
    try:
        os.symlink(model_ts, staged)
    except OSError:
        shutil.copy2(model_ts, staged)
    return staged


def bundle_config_names(model_path: Path) -> list[str]:
    """The bundle configs to parse, in the order the export merged them: ``inference``, the training's record
    ``model_config`` when embedded, then any other embedded override file by name (the archive keeps no order, so
    overlapping override files of one's own should be merged into one before the export).

    Raises:
        DeployInputError: ``model_path`` is neither a TorchScript file with an embedded ``inference`` config nor a
            bundle folder with ``configs/inference.json``.
    """
    if model_path.is_dir():
        if not (model_path / "configs" / "inference.json").is_file():
            raise DeployInputError(f"bundle folder '{model_path}' has no configs/inference.json")
        return ["inference"]
    try:
        with zipfile.ZipFile(model_path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        names, why = [], str(e)
    else:
        why = "a zip without TorchScript code: a state dict?"
    if not any("/code/" in n for n in names):
        raise DeployInputError(f"model '{model_path}' is not a TorchScript file ({why}); give the model.ts made by "
                               "pack_bundle or ckpt_export, or a bundle folder")
    extra = [Path(n).stem for n in names if "/extra/" in n and n.endswith((".json", ".yaml", ".yml"))]
    if "inference" not in extra:
        raise DeployInputError(f"model '{model_path}' has no embedded inference config (found {sorted(extra)}); "
                               "export it with --config_file configs/inference.json (pack_bundle does)")
    first = ["inference"] + (["model_config"] if "model_config" in extra else [])
    return first + sorted(n for n in extra if n not in (*first, "metadata"))


def check_restoration_network(parser, model_path: Path) -> None:
    """The app runs restoration networks (U-Net, SAGAN generator): ``|I - I_hat|`` in ``postprocessing``.

    Raises:
        DeployInputError: the network makes its own anomaly outputs (AnatPaste's classifier: a Grad-CAM map of
            the eager network, which the SDK's operator and TorchScript cannot run).
    """
    import pydoc

    target = str(parser.get("network_def#_target_") or "")
    cls = pydoc.locate(target) if target else None
    if cls is not None and hasattr(cls, "anomaly_outputs"):
        raise DeployInputError(f"model '{model_path}' holds {cls.__name__}: its anomaly map (Grad-CAM) needs the eager "
                               "network, which the Deploy app cannot run; use python -m monai.bundle run inferring "
                               "with configs/methods/inference/anatpaste_classifier.json (docs/deploy.md, Limits)")


def report_settings(model_path: Path, config_names: list[str]) -> dict:
    """Score threshold, mask rule text and bundle version from the bundle config (and ``ART_ASYN_SCORE_THRESHOLD``).

    Raises:
        DeployInputError: the threshold (config ``score_threshold`` or the environment) is not a finite number.
    """
    parser = get_bundle_config(str(model_path), config_names)
    check_restoration_network(parser, model_path)
    raw = os.environ.get(THRESHOLD_ENV, "").strip() or parser.get_parsed_content("score_threshold", default=None)
    try:
        threshold = None if raw in (None, "") else float(raw)
    except (TypeError, ValueError):
        threshold = math.nan
    if threshold is not None and not math.isfinite(threshold):
        raise DeployInputError(f"score threshold {raw!r} (config key score_threshold or ${THRESHOLD_ENV}) "
                               "must be a finite number")
    hp = {k: parser.get_parsed_content(f"hparams#{k}", default=None) for k in ("mask_floor", "mask_rel", "image_size")}
    fixed = parser.get_parsed_content("mask_threshold", default=None)
    rule = (f"fixed: A >= {fixed}" if fixed is not None else
            f"per image: A >= max({hp['mask_floor']}, {hp['mask_rel']} * max A)")
    return {"score_threshold": threshold, "mask_rule": f"A = |I - I_hat| at {hp['image_size']} px; {rule}",
            "software_version": str(parser.get("_meta_#version") or "")}


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under ``folder`` (recursively; :func:`scripts.data.datasets.scan_folder`'s listing)."""
    return [p for p in scan_folder(folder, recursive=True)[0] if image_format(p) == "dicom"]


class Prepared(NamedTuple):
    """What :func:`prepare` worked out once, before Holoscan starts: the model the SDK is given (resolved, and
    staged under its export name), the configs to parse in order, and the report settings."""

    model: Path
    config_names: list[str]
    settings: dict


def prepare(argv: list[str], scratch: Path) -> Prepared:
    """Check the command line's paths and the model (links go to ``scratch``).

    Raises:
        DeployInputError: a path does not exist, the output folder is inside the input folder, or the model is not
            usable (:func:`resolve_model`, :func:`bundle_config_names`, :func:`report_settings`).
    """
    from monai.deploy.core import RuntimeEnv, parse_args

    args, env = parse_args(argv), RuntimeEnv()
    model, inp, out = Path(args.model or env.model), Path(args.input or env.input), Path(args.output or env.output)
    for what, path in (("model", model), ("input", inp)):
        if not path.exists():
            raise DeployInputError(f"{what} path '{path}' does not exist")
    if inp.is_dir() and out.resolve().is_relative_to(inp.resolve()):
        raise DeployInputError(f"output folder '{out}' is inside the input folder '{inp}': its DICOM objects would be "
                               "read as inputs by the next run; choose an output folder outside the input")
    model = resolve_model(model.resolve())
    if model.is_file() and zipfile.is_zipfile(model):
        model = staged_model(model, scratch)
    names = bundle_config_names(model)
    return Prepared(model, names, report_settings(model, names))


class ARTASynCXRApp(Application):
    """DICOM or PNG/JPEG chest X-rays in; DICOM SEG/SC/SR and JSON/PNG anomaly results out (module docstring)."""

    def __init__(self, *args, **kwargs):
        self.counts: Counter = Counter()
        self.scratch = Path(tempfile.mkdtemp(prefix="art_asyn_deploy_"))  # links to inputs/models; removed at the end
        self.prepared: Prepared | None = None  # set by main() (else worked out in compose)
        super().__init__(*args, **kwargs)

    def cleanup(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def compose(self):
        ctx: AppContext = Application.init_app_context(self.argv)
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # one line per copied module otherwise
        in_path, out_path = Path(ctx.input_path).resolve(), Path(ctx.output_path).resolve()
        self.output_path = out_path
        prepared = self.prepared or prepare(self.argv, self.scratch)
        model_path, names, settings = prepared
        # a folder: the operator loads models/model.ts (or model.pt) of it itself; a file: the staged TorchScript
        ctx.models = None if model_path.is_dir() else ModelFactory.create(str(model_path))
        out_path.mkdir(parents=True, exist_ok=True)

        more = BooleanCondition(self, enable_tick=True, name="more_radiographs")
        if in_path.is_file() and has_dicom_preamble(in_path):  # one DICOM file: the DICOM route, with its rules
            linked = self.scratch / "input"
            linked.mkdir()
            os.symlink(in_path, linked / in_path.name)
            dicom, in_path = [in_path], linked
        else:
            dicom = [] if in_path.is_file() else dicom_files(in_path)
        if dicom:
            loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=in_path, must_load=False,
                                             name="dicom_loader")
            selector = ChestXraySeriesSelectorOperator(self, dicom_files=dicom, counts=self.counts,
                                                       name="series_selector")
            images = ChestXrayImageOperator(self, more, counts=self.counts, name="chest_xray_images")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, images, {("study_selected_series_list", "study_selected_series_list")})
            logger.info("input: %d DICOM files in %s", len(dicom), in_path)
        else:
            files, ignored = scan_inputs(in_path)
            for path, why in ignored:
                logger.warning("%s: ignored: %s", path, why)
            images = ChestXrayImageOperator(self, more, files=files, counts=self.counts, name="chest_xray_images")
            logger.info("input: %d image files in %s", len(files), in_path)
        infer = IsolatingBundleInferenceOperator(
            self, app_context=ctx, bundle_path=model_path, name="bundle_inference",
            bundle_config_names=BundleConfigNames(config_names=names),
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping(p, Image if p == "pred_mask" else object, IOType.IN_MEMORY)
                            for p in OUTPUT_PORTS])
        writer = AnomalyResultWriterOperator(self, output_folder=out_path, counts=self.counts, name="results_writer",
                                             **settings)
        self.add_flow(images, infer, {("image", "image")})
        self.add_flow(images, writer, {("source", "source")})
        self.add_flow(infer, writer, {(p, p) for p in OUTPUT_PORTS})

    def summary(self) -> str:
        c = self.counts
        return (f"deploy: {c['inputs']} radiographs: {c['written']} written, {c['skipped']} skipped, "
                f"{c['failed']} failed -> {getattr(self, 'output_path', '?')}")


def main(argv: list[str] | None = None) -> int:
    """Run the application (``argv``: the arguments after the program, default ``sys.argv[1:]``).

    Exit status 1 when inputs were found but nothing was written, 2 when the model or input cannot be used.
    """
    full = [sys.argv[0], *argv] if argv is not None else list(sys.argv)
    app = ARTASynCXRApp(full) if argv is not None else ARTASynCXRApp()
    try:
        try:
            app.prepared = prepare(full, app.scratch)
        except DeployInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        app.run()
    finally:
        app.cleanup()
    print(app.summary(), flush=True)
    return 1 if app.counts["inputs"] and not app.counts["written"] else 0
