"""Run the comparison grid (methods x loss settings) and print the Table 2 style table.

Every cell trains on ``<dataset_dir>/train`` and is evaluated on ``<test_dir>/test`` (default: the same dataset)
with the same budget; all runs go to one MLflow experiment. Complete cells are skipped and a killed cell
resumes from its checkpoint, so re-running the same command continues the grid. Usage (repository root)::

    python -m scripts.cli.compare --dataset_dir data/zhanglab --methods none,cutpaste,nsa,anatpaste,fpi,artasyn \\
        --losses global,artasyn --budget configs/overrides/cpu_budget.json --out runs/compare
    python -m scripts.cli.compare --dataset_dir data/zhanglab --methods ... --budget ... --out runs/compare --table-only
    python -m scripts.cli.compare ... --zero_shot_dir ../shared/data/cxr/nih   # + zero-shot AUROC/AP/Dice columns

Model families of their own (``anatpaste_classifier``, ``sagan``) take one cell each with their own loss, so the
paper's Table 1 rows are, e.g., ``--cells artasyn:artasyn,anatpaste_classifier,sagan,none:global,...``. SAGAN's
unlabelled images come from ``--unlabelled_dir`` (default ``<dataset_dir>``: its ``train/unlabelled/`` folder,
which ``python -m scripts.data.convert zhanglab`` fills with a sample of the training images of both classes).

Writes ``<out>/table.md``, ``<out>/table.csv`` and ``<out>/table.png``; the tracking store defaults to
``sqlite:///<out>/mlruns.db``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from scripts import comparison as cmp


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset_dir", required=True, help="training dataset (train/healthy, ...)")
    ap.add_argument("--test_dir", default=None, help="dataset evaluated on (its test/ split); default --dataset_dir")
    ap.add_argument("--methods", default="none,artasyn",
                    help=f"comma-separated methods of configs/methods/ ({', '.join(cmp.available_methods())})")
    ap.add_argument("--losses", default="global,artasyn", help="comma-separated loss settings: global, artasyn")
    ap.add_argument("--cells", default=None,
                    help="explicit method:loss pairs instead of the methods x losses grid, e.g. the paper's Table 2 "
                         "rows none:global,cutpaste:artasyn,nsa:artasyn,anatpaste:artasyn,fpi:artasyn,artasyn:artasyn")
    ap.add_argument("--unlabelled_dir", default=None,
                    help="SAGAN's unlabelled images: a dataset folder with train/unlabelled/, a plain image folder or "
                         "a dataset CSV (split 'unlabelled'); default --dataset_dir")
    ap.add_argument("--zero_shot_dir", default=None,
                    help="also evaluate every cell's model on this dataset's test split (e.g. one with lesion masks: "
                         "zero-shot Dice columns 'zs ...', as ART-ASyn's QaTa-ZeroShot column)")
    ap.add_argument("--budget", type=Path, default=None, help="override file with the budget (image size, epochs, ...)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (cells, tables, default tracking store)")
    ap.add_argument("--tracking_uri", default=None, help="MLflow tracking URI (default sqlite:///<out>/mlruns.db)")
    ap.add_argument("--experiment", default=cmp.EXPERIMENT, help=f"MLflow experiment (default {cmp.EXPERIMENT})")
    ap.add_argument("--table-only", action="store_true", help="only re-render the table from MLflow")
    return ap.parse_args(argv)


def run_one(args, cell, label: str, out: Path, uri: str, budget: str, t0: float) -> None:
    """Train + evaluate ``cell`` unless MLflow has it complete; then its zero-shot evaluation if asked and missing."""
    sagan = args.unlabelled_dir and cell.method == "sagan"
    extra = {"unlabelled_dir": args.unlabelled_dir} if sagan else {}
    done = cmp.eval_runs(uri, args.experiment)
    if cmp.latest_eval(done, cell, budget) is not None:
        print(f"{label}: complete in MLflow, skipped", flush=True)
    else:
        print(f"{label}: training and evaluating (elapsed {time.perf_counter() - t0:.0f} s)", flush=True)
        cmp.run_cell(cell, args.dataset_dir, args.test_dir or args.dataset_dir, args.budget, out, uri,
                     args.experiment, extra)
    if args.zero_shot_dir and cmp.latest_zero_shot(done, cell, budget, args.zero_shot_dir) is None:
        print(f"{label}: zero-shot evaluation on {args.zero_shot_dir}", flush=True)
        cmp.run_zero_shot(cell, args.dataset_dir, args.zero_shot_dir, args.budget, out, uri, args.experiment, extra)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cells = cmp.parse_cells(args.cells) if args.cells else \
            cmp.plan_grid([m for m in args.methods.split(",") if m], [v for v in args.losses.split(",") if v])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.budget is not None and not args.budget.is_file():
        print(f"error: budget file not found: '{args.budget}'", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{out / 'mlruns.db'}"
    budget = cmp.budget_name(args.budget)
    failed = []
    if not args.table_only:
        t0 = time.perf_counter()
        for i, cell in enumerate(cells, 1):
            try:
                run_one(args, cell, f"[{i}/{len(cells)}] {cell.name}", out, uri, budget, t0)
            except Exception as e:  # one failed cell never costs the others; reported and counted below
                logging.getLogger("compare").exception("cell %s failed", cell.name)
                failed.append(f"{cell.name}: {type(e).__name__}: {e}")
    rows = cmp.table_rows(cmp.eval_runs(uri, args.experiment), cells, budget, args.zero_shot_dir)
    title = f"{Path(args.dataset_dir).name} -> {Path(args.test_dir or args.dataset_dir).name}, budget {budget}"
    if args.zero_shot_dir:
        title += f"; zs = zero-shot on {Path(args.zero_shot_dir).name}"
    print(cmp.write_tables(out, rows, title))
    print(f"{len(rows)}/{len(cells)} cells in the table: {out / 'table.md'}, table.csv, table.png; MLflow: {uri}")
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
