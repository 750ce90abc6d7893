"""Convert public chest X-ray datasets to the folder convention of :mod:`scripts.data.datasets`.

Supported sources (point ``--src`` at the folder you downloaded):

- ``chexpert``: ``CheXpert-v1.0[-small]`` with ``train.csv`` and ``valid.csv``. Frontal images only.
  train/healthy = train.csv rows with "No Finding" = 1; test = valid.csv (healthy when "No Finding" = 1,
  diseased otherwise).
- ``zhanglab``: Kermany/ZhangLab ``chest_xray/{train,test}/{NORMAL,PNEUMONIA}``. train/NORMAL ->
  train/healthy, test/NORMAL -> test/healthy, test/PNEUMONIA -> test/diseased. For semi-supervised methods
  (SAGAN), ``train/unlabelled`` gets a fixed sample of ``--unlabelled`` training images (default 1000) of both
  classes, ``--anomaly_ratio`` (default 0.6, SAGAN's setting) of them pneumonia, evenly spaced by file name;
  its labels are never read (``--unlabelled 0`` skips it). Healthy images of the sample are also in
  train/healthy. A download without ``train/`` converts its test split only (a zero-shot evaluation target,
  see ``test_dir`` in configs/evaluate.json).
- ``qata``: QaTa-COV19-v2 ``<Train|Test> Set/Images`` and ``Ground-truths`` (``mask_<name>.png``):
  all images -> test/diseased with their masks in ground_truth/diseased (zero-shot segmentation).

Files are linked (``--mode symlink``, default, no extra disk), copied (``--mode copy``), or only listed in
a CSV (``--mode csv``, columns image,label,mask,split). ``--dry-run`` prints the plan and writes nothing.

Example::

    python -m scripts.data.convert zhanglab --src ~/data/chest_xray --out data/zhanglab --dry-run
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from scripts.data.datasets import evenly_spaced, list_images

logger = logging.getLogger(__name__)

# one planned file: (source path, destination relative path, label, split, mask source or None)
Plan = list[tuple[Path, str, int, str, Path | None]]


def _truthy(v: str) -> bool:
    try:
        return float(v) == 1.0
    except (TypeError, ValueError):
        return False


def plan_chexpert(src: Path) -> Plan:
    """CheXpert: frontal "No Finding" training images; valid.csv as the labelled test set."""
    plan: Plan = []
    for csv_name, split in (("train.csv", "train"), ("valid.csv", "test")):
        csv_path = src / csv_name
        if not csv_path.is_file():
            raise FileNotFoundError(f"CheXpert: '{csv_path}' not found (point --src at CheXpert-v1.0[-small])")
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("Frontal/Lateral", "Frontal") != "Frontal":
                    continue
                healthy = _truthy(row.get("No Finding", ""))
                if split == "train" and not healthy:
                    continue
                rel = Path(row["Path"])
                parts = rel.parts[1:] if rel.parts and rel.parts[0].startswith("CheXpert") else rel.parts
                path = src.joinpath(*parts)
                name = "_".join(parts[-3:])  # patientXXXX_studyN_viewN_frontal.jpg: unique
                sub = "healthy" if healthy else "diseased"
                plan.append((path, f"{split}/{sub}/{name}", 0 if healthy else 1, split, None))
    return plan


def _zhanglab_root(src: Path) -> Path:
    return src / "chest_xray" if (src / "chest_xray").is_dir() and not (src / "train").is_dir() else src


def plan_zhanglab(src: Path, unlabelled: int = 0, anomaly_ratio: float = 0.6) -> Plan:
    """ZhangLab/Kermany: NORMAL and PNEUMONIA folders of train/ and test/, plus the ``train/unlabelled`` sample of
    ``unlabelled`` images (:func:`plan_unlabelled`; 0: none)."""
    src = _zhanglab_root(src)
    plan: Plan = []
    folders = (("train", "train/NORMAL", "healthy", 0), ("test", "test/NORMAL", "healthy", 0),
               ("test", "test/PNEUMONIA", "diseased", 1))
    present = [f for f in folders if (src / f[1]).is_dir()]
    if not present:
        raise FileNotFoundError(f"ZhangLab: none of {[f[1] for f in folders]} found under '{src}' "
                                f"(point --src at chest_xray/)")
    for _, folder, _, _ in folders:
        if (src / folder).is_dir():
            continue
        if folder.startswith("train"):  # a zero-shot target: test images only
            logger.warning("ZhangLab: no '%s' under '%s': converting the test split only (a zero-shot target)",
                           folder, src)
        else:
            raise FileNotFoundError(f"ZhangLab: folder '{src / folder}' not found (point --src at chest_xray/)")
    for split, folder, sub, label in present:
        plan += [(p, f"{split}/{sub}/{p.name}", label, split, None) for p in list_images(src / folder)]
    return plan + (plan_unlabelled(src, unlabelled, anomaly_ratio) if unlabelled else [])


def plan_qata(src: Path) -> Plan:
    """QaTa-COV19-v2: every image with its ground-truth mask, as diseased test images."""
    sets = [d for d in sorted(src.iterdir()) if d.is_dir() and (d / "Images").is_dir()] if src.is_dir() else []
    if (src / "Images").is_dir():
        sets = [src]
    if not sets:
        raise FileNotFoundError(f"QaTa: no '<set>/Images' folder under '{src}'")
    plan: Plan = []
    for s in sets:
        prefix = "" if s == src else s.name.split()[0].lower() + "_"
        for p in list_images(s / "Images"):
            mask = s / "Ground-truths" / f"mask_{p.name}"
            plan.append((p, f"test/diseased/{prefix}{p.name}", 1, "test", mask if mask.is_file() else None))
    return plan


def plan_unlabelled(src: Path, n: int = 1000, anomaly_ratio: float = 0.6) -> Plan:
    """ZhangLab's unlabelled pool: ``n`` training images, ``anomaly_ratio`` of them from train/PNEUMONIA.

    SAGAN (Zhang et al., MICCAI 2024) Sec. 3.1 trains on healthy images plus unlabelled ones of both classes
    (anomaly ratio 60% in its comparisons). The labels are kept in the CSV (split ``unlabelled``, label -1)
    only as the unlabelled marker; no method reads them.

    Raises:
        ValueError: ``anomaly_ratio`` outside [0, 1] or ``n`` negative.
    """
    if not 0.0 <= anomaly_ratio <= 1.0 or n < 0:
        raise ValueError(f"need n >= 0 and 0 <= anomaly_ratio <= 1, got n={n}, anomaly_ratio={anomaly_ratio}")
    src = _zhanglab_root(src)
    n_sick = round(n * anomaly_ratio)
    picks = []
    for folder, count in (("train/PNEUMONIA", n_sick), ("train/NORMAL", n - n_sick)):
        if count and (src / folder).is_dir():
            images = list_images(src / folder)
            picks += [images[i] for i in evenly_spaced(len(images), count)]
    return [(p, f"train/unlabelled/{p.name}", -1, "unlabelled", None) for p in picks]


PLANNERS = {"chexpert": plan_chexpert, "zhanglab": plan_zhanglab, "qata": plan_qata}


def _place(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    if mode == "symlink":
        os.symlink(src.resolve(), tmp)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def convert(dataset: str, src, out, mode: str = "symlink", dry_run: bool = False, unlabelled: int = 1000,
            anomaly_ratio: float = 0.6) -> Counter:
    """Convert ``dataset`` at ``src`` into ``out``; return counts per destination folder.

    ``unlabelled`` / ``anomaly_ratio``: the size and pneumonia fraction of ZhangLab's ``train/unlabelled`` sample
    (:func:`plan_unlabelled`; other datasets have none).
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if dataset not in PLANNERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(PLANNERS)}")
    if mode not in ("symlink", "copy", "csv"):
        raise ValueError(f"mode must be symlink, copy or csv, got {mode!r}")
    plan = plan_zhanglab(src, unlabelled, anomaly_ratio) if dataset == "zhanglab" else PLANNERS[dataset](src)
    missing = [p for p, *_ in plan if not p.is_file()]
    if missing:
        logger.warning("%d listed images are missing on disk and are skipped (first: %s)", len(missing), missing[0])
        plan = [row for row in plan if row[0].is_file()]
    counts = Counter(str(Path(rel).parent) for _, rel, *_ in plan)
    counts["ground_truth/diseased"] = sum(m is not None for *_, m in plan)
    print(f"{dataset}: {len(plan)} images from {src} -> {out} ({mode})")
    for k in sorted(counts):
        print(f"  {k:24s} {counts[k]}")
    for p, rel, *_ in plan[:3]:
        print(f"  e.g. {p} -> {out / rel}")
    if dry_run:
        print("dry run: nothing written")
        return counts
    if mode == "csv":
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".dataset.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label", "mask", "split"])
            for p, _, label, split, m in plan:
                w.writerow([p.resolve(), label, m.resolve() if m else "", split])
        os.replace(tmp, out / "dataset.csv")
        print(f"wrote {out / 'dataset.csv'}")
        return counts
    for sub in ("train/healthy", "test/healthy", "test/diseased"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i, (p, rel, _, _, m) in enumerate(plan, 1):
        _place(p, out / rel, mode)
        if m is not None:
            _place(m, out / "ground_truth/diseased" / Path(rel).name, mode)
        if i % 1000 == 0:
            logger.info("%d / %d files placed", i, len(plan))
    print(f"done: {out}")
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(PLANNERS))
    ap.add_argument("--src", required=True, help="folder of the downloaded dataset")
    ap.add_argument("--out", required=True, help="output folder in the train/test/ground_truth convention")
    ap.add_argument("--mode", default="symlink", choices=("symlink", "copy", "csv"))
    ap.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    ap.add_argument("--unlabelled", type=int, default=1000,
                    help="zhanglab: size of the train/unlabelled sample for semi-supervised methods (0: none)")
    ap.add_argument("--anomaly_ratio", type=float, default=0.6,
                    help="zhanglab: fraction of pneumonia images in train/unlabelled (SAGAN: 0.6)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        convert(args.dataset, args.src, args.out, args.mode, args.dry_run, args.unlabelled, args.anomaly_ratio)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
