"""The papers' comparisons (ART-ASyn Tables 1 and 2): a grid of synthesis methods x loss settings and of model
families (AnatPaste's classifier, SAGAN), each cell a training plus a test evaluation under one budget, all in
one MLflow experiment, and the table built from MLflow.

A cell is ``(method, loss)``: the configs ``train.json`` + the budget override + ``configs/methods/<method>.json``
(+ ``configs/overrides/loss_global.json`` for ``loss="global"``, the U-Net's global MSE only; ``"artasyn"`` is the
paper's four terms) + the budget's refinement for that method, ``<budget>.<method>.json`` beside the budget file,
when there is one (e.g. ``cpu_grid.sagan.json``: the GAN's widths at the CPU budget). A method whose file sets its
own ``loss_name`` (a model family of its own: ``anatpaste_classifier`` ``ce``, ``sagan`` ``wgan_gp``) has one cell
with that loss, whatever the loss settings of the grid. Each cell trains in ``<out>/cells/<method>_<loss>/``
(checkpoints there, so a killed cell resumes). Its evaluation run carries ``method``, ``loss_name`` and ``budget``
as parameters and, as metrics, ``train_seconds`` (wall time of all training attempts of the cell) and
``images_seen`` (training iterations x batch size: healthy images drawn, each giving one clean and 1-3 synthetic
samples). A cell whose evaluation run is FINISHED with those metrics is complete and skipped, so a grid can span
several invocations or machines sharing the tracking store.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from custom_transforms.io import atomic_write_bytes
from custom_transforms.utils import Choice
from scripts.visualization import save_figure

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LOSSES = ("global", "artasyn")
TABLE_COLUMNS = ("method", "loss", "auroc", "ap", "dice_micro", "dice_mean", "train_seconds", "images_seen", "run_id")
METRIC_COLUMNS = ("auroc", "ap", "dice_micro", "dice_mean")
ZERO_SHOT_COLUMNS = ("zs_auroc", "zs_ap", "zs_dice_micro", "zs_dice_mean")  # the same metrics on another dataset
EXPERIMENT = "comparison"

validate_loss = Choice("losses", LOSSES, "loss setting")


def available_methods() -> tuple[str, ...]:
    """Method names that have an override file in ``configs/methods/``."""
    return tuple(sorted(p.stem for p in (CONFIGS / "methods").glob("*.json")))


def own_loss(method: str) -> str | None:
    """The fixed loss of a method that is a model family of its own (its file's ``loss_name`` is not one of
    :data:`LOSSES`), else None (a synthesis method for the U-Net, trained under each loss setting)."""
    cfg = json.loads((CONFIGS / "methods" / f"{method}.json").read_text())
    loss = cfg.get("+hparams", {}).get("loss_name")
    return loss if loss is not None and loss not in LOSSES else None


def validate_method(name: str) -> str:
    """Check a method name against ``configs/methods/``.

    Raises:
        ValueError: no ``configs/methods/<name>.json``; the message lists the methods there.
    """
    return Choice("methods", available_methods(), "method")(name)


@dataclass(frozen=True)
class Cell:
    """One grid cell: a synthesis method trained with one loss setting."""

    method: str
    loss: str

    @property
    def name(self) -> str:
        return f"{self.method}_{self.loss}"

    def config_files(self, budget: Path | None) -> list[str]:
        files = [CONFIGS / "train.json"] + ([Path(budget)] if budget else [])
        files.append(CONFIGS / "methods" / f"{self.method}.json")
        if self.loss == "global":
            files.append(CONFIGS / "overrides" / "loss_global.json")
        refinement = Path(budget).with_name(f"{Path(budget).stem}.{self.method}.json") if budget else None
        if refinement is not None and refinement.is_file():
            files.append(refinement)
        return [str(f) for f in files]


def make_cell(method: str, loss: str | None) -> Cell:
    """A validated cell; ``loss=None`` takes a model family's own loss.

    Raises:
        ValueError: unknown method; a loss setting a model family does not have; no loss for a synthesis method.
    """
    own = own_loss(validate_method(method))
    if own is not None:
        if loss not in (None, own):
            raise ValueError(f"method {method!r} trains with its own loss {own!r}, got loss {loss!r}")
        return Cell(method, own)
    if loss is None:
        raise ValueError(f"method {method!r} needs a loss setting: one of {LOSSES} (e.g. {method}:artasyn)")
    return Cell(method, validate_loss(loss))


def plan_grid(methods, losses) -> list[Cell]:
    """Cells of ``methods x losses`` (validated), in the given order; one cell for a model family."""
    losses = [validate_loss(v) for v in losses]
    if not methods or not losses:
        raise ValueError("the grid needs at least one method and one loss setting")
    cells = []
    for m in methods:
        cells += [make_cell(m, None)] if own_loss(validate_method(m)) else [make_cell(m, v) for v in losses]
    return cells


def parse_cells(spec: str) -> list[Cell]:
    """Explicit cells ``"none:global,artasyn:artasyn,sagan"`` (method:loss pairs; a model family alone), validated.

    Raises:
        ValueError: a synthesis method without ``:loss``, an unknown method or loss setting, or no pair at all.
    """
    cells = []
    for pair in (p for p in spec.split(",") if p):
        method, sep, loss = pair.partition(":")
        cells.append(make_cell(method, loss if sep else None))
    if not cells:
        raise ValueError("cells is empty")
    return cells


def budget_name(budget: Path | None) -> str:
    return Path(budget).stem if budget else "default"


# ----------------------------------------------------------------------------------------------- MLflow


def eval_runs(tracking_uri: str, experiment: str):
    """FINISHED evaluation runs of ``experiment``, newest first, as a DataFrame (``params.*``, ``metrics.*``)."""
    import mlflow
    import pandas as pd

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    rows = []
    for r in client.search_runs([exp.experiment_id], "tags.stage = 'evaluate' and attributes.status = 'FINISHED'",
                                order_by=["attributes.start_time DESC"], max_results=5000):
        row = {"run_id": r.info.run_id, "start_time": r.info.start_time}
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
        row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _latest(runs, need: dict, complete: str | None = None):
    """The newest row of ``runs`` whose columns hold the values of ``need`` (and, with ``complete``, a value in
    that column), or None."""
    columns = list(need) + ([complete] if complete else [])
    if runs is None or len(runs) == 0 or any(k not in runs.columns for k in columns):
        return None
    sel = runs
    for k, v in need.items():
        sel = sel[sel[k] == v]
    if complete:
        sel = sel[sel[complete].notna()]
    return None if len(sel) == 0 else sel.iloc[0]


def _cell_params(cell: Cell, budget: str) -> dict:
    return {"params.method": cell.method, "params.loss_name": cell.loss, "params.budget": budget}


def latest_eval(runs, cell: Cell, budget: str):
    """The newest complete evaluation run of ``cell`` under ``budget`` (a row of ``runs``) or None."""
    return _latest(runs, _cell_params(cell, budget), complete="metrics.train_seconds")


def latest_zero_shot(runs, cell: Cell, budget: str, zero_shot_dir):
    """The newest zero-shot evaluation of ``cell``'s model (trained under ``budget``) on ``zero_shot_dir``, or None."""
    return _latest(runs, {**_cell_params(cell, budget), "tags.zero_shot_dir": str(zero_shot_dir)})


def _metric(r, k: str):
    v = r.get(f"metrics.test_{k}", r.get(f"metrics.{k}"))
    return None if v is None or v != v else float(v)


def table_rows(runs, cells: list[Cell], budget: str, zero_shot_dir=None) -> list[dict]:
    """One row per cell with a complete evaluation run (columns :data:`TABLE_COLUMNS`); with ``zero_shot_dir``
    also :data:`ZERO_SHOT_COLUMNS` from the cell's zero-shot evaluation (None where there is none)."""
    rows = []
    for cell in cells:
        r = latest_eval(runs, cell, budget)
        if r is None:
            continue
        row = {"method": cell.method, "loss": cell.loss, "run_id": r["run_id"]}
        row.update({k: _metric(r, k) for k in METRIC_COLUMNS + ("train_seconds", "images_seen")})
        if zero_shot_dir is not None:
            z = latest_zero_shot(runs, cell, budget, zero_shot_dir)
            row.update({k: None if z is None else _metric(z, k[3:]) for k in ZERO_SHOT_COLUMNS})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- rendering


def _fmt(v, k: str) -> str:
    if v is None:
        return "-"
    if k in ("train_seconds", "images_seen"):
        return f"{v:.0f}"
    return f"{v:.3f}"


def _metric_columns(rows: list[dict]) -> tuple[str, ...]:
    return METRIC_COLUMNS + (ZERO_SHOT_COLUMNS if any("zs_auroc" in r for r in rows) else ())


def render_markdown(rows: list[dict], title: str = "") -> str:
    """Tables 1/2 layout: one row per cell; the best value of each metric column in bold; zero-shot columns
    (``zs ...``) when the rows have them."""
    metrics = _metric_columns(rows)
    best = {k: max((r[k] for r in rows if r[k] is not None), default=None) for k in metrics}
    names = {"auroc": "AUROC", "ap": "AP", "dice_micro": "Dice (micro)", "dice_mean": "Dice (mean)"}
    head = (["method", "loss"] + [names.get(k) or f"zs {names[k[3:]]}" for k in metrics]
            + ["train s", "images seen"])
    lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                         "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["loss"]]
        for k in metrics:
            s = _fmt(r[k], k)
            cells.append(f"**{s}**" if r[k] is not None and r[k] == best[k] else s)
        cells += [_fmt(r["train_seconds"], "train_seconds"), _fmt(r["images_seen"], "images_seen")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict]) -> str:
    columns = list(TABLE_COLUMNS) + [k for k in _metric_columns(rows) if k not in TABLE_COLUMNS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows({k: ("" if r[k] is None else r[k]) for k in columns} for r in rows)
    return buf.getvalue()


def bar_chart_png(path, rows: list[dict], title: str = "") -> Path:
    """Grouped bars of AUROC, AP and Dice (micro) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['method']}\n{r['loss']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6), dpi=90)
    for i, k in enumerate(("auroc", "ap", "dice_micro")):
        ax.bar(x + (i - 1) * 0.27, [r[k] or 0.0 for r in rows], 0.27, label=k)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def write_tables(out: Path, rows: list[dict], title: str) -> str:
    """``table.md``, ``table.csv`` and ``table.png`` in ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(rows, title)
    atomic_write_bytes(out / "table.md", md.encode())
    atomic_write_bytes(out / "table.csv", render_csv(rows).encode())
    if rows:
        bar_chart_png(out / "table.png", rows, title)
    return md


# ------------------------------------------------------------------------------------------------ running


def _workflow(files, workflow_type: str, overrides: dict):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=files, workflow_type=workflow_type, meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, **overrides)
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()
    return wf


def _evaluate(cell: Cell, budget: Path | None, overrides: dict):
    """Run the evaluation workflow of ``cell`` (``configs/evaluate.json`` over its training configs) with
    ``overrides``; returns ``(the MLflow evaluation run id, the finished workflow)``."""
    wf = _workflow(cell.config_files(budget) + [str(CONFIGS / "evaluate.json")], "eval", overrides)
    return wf.parser.get_parsed_content("evaluation_report").run_id, wf


def _progress(cell_dir: Path) -> dict:
    p = cell_dir / "progress.json"
    return json.loads(p.read_text()) if p.is_file() else {"train_seconds": 0.0, "trained": False}


def _save_progress(cell_dir: Path, progress: dict) -> None:
    atomic_write_bytes(cell_dir / "progress.json", json.dumps(progress, indent=1).encode())


def _cell_overrides(cell_dir: Path, dataset_dir, budget: Path | None, tracking_uri: str, experiment: str,
                    extra: dict | None) -> dict:
    """Workflow overrides every run of a cell shares: its folder, data, tracking store and budget name."""
    return {"bundle_root": str(cell_dir), "dataset_dir": str(dataset_dir), "tracking_uri": tracking_uri,
            "experiment_name": experiment, "hparams#budget": budget_name(budget), **(extra or {})}


def run_cell(cell: Cell, dataset_dir, test_dir, budget: Path | None, out: Path, tracking_uri: str,
             experiment: str = EXPERIMENT, extra: dict | None = None) -> str:
    """Train (resuming from the cell's checkpoint) and evaluate one cell; returns the evaluation run id."""
    import mlflow

    cell_dir = out / "cells" / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    files = cell.config_files(budget)
    common = _cell_overrides(cell_dir, dataset_dir, budget, tracking_uri, experiment, extra)
    progress = _progress(cell_dir)
    if not progress["trained"]:
        t0 = time.perf_counter()
        try:
            _workflow(files, "train", {**common, "run_name": cell.name, "resume": True})
        finally:  # a killed or failed attempt still counts its wall time
            progress["train_seconds"] += time.perf_counter() - t0
            _save_progress(cell_dir, progress)
        progress["trained"] = True
        _save_progress(cell_dir, progress)
    run_id, wf = _evaluate(cell, budget, {**common, "test_dir": str(test_dir), "eval_run_name": f"eval_{cell.name}"})
    batch = wf.parser.get_parsed_content("hparams#batch_size")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    train_run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                   f"attributes.run_name = '{cell.name}'", order_by=["attributes.start_time DESC"],
                                   max_results=1)
    iterations = 0
    if train_run:
        history = client.get_metric_history(train_run[0].info.run_id, "loss")
        iterations = max((m.step for m in history), default=0)
        if "train_run_id" not in client.get_run(run_id).data.tags:  # the config could not tell it
            client.set_tag(run_id, "train_run_id", train_run[0].info.run_id)
    client.log_metric(run_id, "images_seen", float(iterations * batch))
    client.log_metric(run_id, "train_seconds", float(progress["train_seconds"]))  # logged last: complete
    return run_id


def run_zero_shot(cell: Cell, dataset_dir, zero_shot_dir, budget: Path | None, out: Path, tracking_uri: str,
                  experiment: str = EXPERIMENT, extra: dict | None = None) -> str:
    """Evaluate the trained model of ``cell`` on ``<zero_shot_dir>/test`` (another dataset; e.g. one with lesion
    masks, for the Dice columns, like ART-ASyn's QaTa-ZeroShot column); returns the evaluation run id.

    The run is tagged ``zero_shot_dir`` and written to ``<cell>/output/eval_zeroshot``.

    Raises:
        FileNotFoundError: the cell has no trained model (``models/model.pt``).
    """
    cell_dir = out / "cells" / cell.name
    if not (cell_dir / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"cell {cell.name}: no trained model at '{cell_dir / 'models' / 'model.pt'}'")
    run_id, _ = _evaluate(cell, budget, {
        **_cell_overrides(cell_dir, dataset_dir, budget, tracking_uri, experiment, extra),
        "test_dir": str(zero_shot_dir), "eval_run_name": f"zeroshot_{cell.name}",
        "eval_dir": str(cell_dir / "output" / "eval_zeroshot"),
        "evaluation_report#tags#zero_shot_dir": str(zero_shot_dir),  # tagged as the run is logged
    })
    return run_id
