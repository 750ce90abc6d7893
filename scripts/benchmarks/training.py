"""Benchmark training throughput and the share of step time spent waiting for data.

Builds the trainer of ``configs/train.json`` (plus any override configs) with MONAI's ``ConfigParser``,
runs ``--epochs`` epochs with validation, checkpoints and MLflow switched off, and times every
iteration with ignite events:

* data wait = ``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED`` (the loader producing a batch: cached
  deterministic transforms + on-the-fly ``ARTASynd`` synthesis in the workers);
* compute = ``ITERATION_STARTED`` -> ``ITERATION_COMPLETED`` (forward, losses, backward, step).

It prints, per epoch after the first (warm-up: worker start, caches), images/s (training samples, clean
and synthetic, per second of wall time) and the data-wait share ``wait / (wait + compute)``, then their
medians. Usage (from the repository root)::

    python -m scripts.benchmarks.training                                  # demo phantoms, demo config
    python -m scripts.benchmarks.training --dataset_dir ../shared/data/cxr/nih \\
        --config configs/overrides/cpu_budget.json
    python -m scripts.benchmarks.training --num_workers 0                  # synthesis in the main process
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from scripts.data.phantoms import ensure_demo_dataset

REPO = Path(__file__).resolve().parents[2]


class StepTimer:
    """Accumulate per-epoch data-wait and compute seconds and the number of samples of an ignite engine."""

    def __init__(self):
        self.epochs: list[dict] = []
        self._t: dict[str, float] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        on = engine.add_event_handler
        on(Events.EPOCH_STARTED, self._epoch_started)
        on(Events.GET_BATCH_STARTED, lambda e: self._mark("batch"))
        on(Events.GET_BATCH_COMPLETED, lambda e: self._add("wait", "batch"))
        on(Events.ITERATION_STARTED, lambda e: self._mark("iter"))
        on(Events.ITERATION_COMPLETED, self._iteration_completed)
        on(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _mark(self, name: str) -> None:
        self._t[name] = time.perf_counter()

    def _add(self, key: str, mark: str) -> None:
        self.epochs[-1][key] += time.perf_counter() - self._t[mark]

    def _epoch_started(self, engine) -> None:
        self.epochs.append({"wait": 0.0, "compute": 0.0, "samples": 0, "wall": time.perf_counter()})

    def _iteration_completed(self, engine) -> None:
        self._add("compute", "iter")
        self.epochs[-1]["samples"] += int(engine.state.batch["image"].shape[0])

    def _epoch_completed(self, engine) -> None:
        e = self.epochs[-1]
        e["wall"] = time.perf_counter() - e["wall"]
        e["images_per_s"] = e["samples"] / e["wall"]
        e["wait_share"] = e["wait"] / max(e["wait"] + e["compute"], 1e-9)


def build_trainer(config_files: list[str], overrides: dict):
    """The configured ``SupervisedTrainer`` with validation, checkpoints and tracking removed."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update(overrides)
    # no validation, checkpoints, MLflow or per-iteration logging
    parser["train"]["handlers_all_ranks"] = []
    parser["train"]["handlers_main_rank"] = []
    parser["train"]["handlers_reporting"] = []  # no progress bar or MLflow reporting in a benchmark
    return parser.get_parsed_content("train#trainer", instantiate=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset_dir", default=None, help="dataset root (default: the demo phantoms)")
    ap.add_argument("--config", action="append", default=[],
                    help="override config merged over configs/train.json (repeatable; "
                         "default configs/overrides/demo.json)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs to run; the first is warm-up (default 4)")
    ap.add_argument("--num_workers", type=int, default=None, help="override the loader workers")
    ap.add_argument("--max_images", type=int, default=None, help="use at most this many training images")
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is warm-up)")

    default_override = str(REPO / "configs" / "overrides" / "demo.json")
    configs = [str(REPO / "configs" / "train.json")] + (args.config or [default_override])
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"bundle_root": tmp, "hparams#max_epochs": args.epochs, "resume": False}
        if args.dataset_dir:
            overrides["dataset_dir"] = str(Path(args.dataset_dir).resolve())
        else:  # the demo phantoms, generated once in <repo>/demo_data
            overrides["dataset_dir"] = str(ensure_demo_dataset(REPO / "demo_data"))
        if args.num_workers is not None:
            overrides["num_workers"] = args.num_workers
        if args.max_images:
            overrides["data_split"] = ("$scripts.data.datasets.split_holdout(scripts.data.datasets.discover("
                                       f"@dataset_dir, 'train')[:{args.max_images}], @hparams#val_fraction)")
        trainer = build_trainer(configs, overrides)
        loader = trainer.data_loader
        timer = StepTimer()
        timer.attach(trainer)
        print(f"training {args.epochs} epochs: {len(loader.dataset)} images, batch {loader.batch_size}, "
              f"{loader.num_workers} workers, configs {[Path(c).name for c in configs]}", flush=True)
        trainer.run()

    print(f"{'epoch':>5} {'images/s':>9} {'wait %':>7} {'wall s':>7} {'samples':>8}")
    for i, e in enumerate(timer.epochs, 1):
        tag = " (warm-up)" if i == 1 else ""
        print(f"{i:>5} {e['images_per_s']:>9.1f} {100 * e['wait_share']:>7.1f} {e['wall']:>7.1f} "
              f"{e['samples']:>8}{tag}")
    steady = timer.epochs[1:]
    ips = statistics.median(e["images_per_s"] for e in steady)
    wait = statistics.median(e["wait_share"] for e in steady)
    print(f"median over {len(steady)} epochs: {ips:.1f} images/s, data wait {100 * wait:.1f}% of step time "
          f"(target < 10%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
