"""Dataset discovery: the anomaly-detection folder convention or a CSV list, as MONAI data dicts.

Folder convention (the layout of ChestX-ray14 subsets used by ART-ASyn and of the demo phantoms)::

    <root>/train/healthy/*.png            training normals
    <root>/test/healthy/*.png             test normals       (label 0)
    <root>/test/diseased/*.png            test abnormals     (label 1)
    <root>/ground_truth/diseased/<name>   lesion masks, same file name as the diseased image (optional)

Folders are listed by :func:`list_images` / :func:`scan_folder`: not recursive unless asked, DICOM files found by
their content whatever their name (``IM0001``), and every entry that is not listed reported with its reason
(sub-folder, broken link, unsupported suffix such as ``.webp``, hidden or temporary file).

CSV list (any other layout): columns ``image,label,mask`` (``mask`` optional, may be empty) and optionally
``split``; relative paths are resolved against the CSV's folder. A row with label 1 and no split is never
used for training (see :func:`discover_csv`). Each data dict is
``{"image": path, "label": 0|1, "split": ..., "name": ...}`` plus ``"gt_mask": path`` when the image has a
lesion mask (the key is left out otherwise, so that batches collate; ``LoadCXRd`` fills empty masks).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from custom_transforms.io import IMAGE_SUFFIXES, CXRReadError, image_format

logger = logging.getLogger(__name__)

SPLITS = {
    "train": [("train/healthy", 0)],
    "test": [("test/healthy", 0), ("test/diseased", 1)],
    "test_healthy": [("test/healthy", 0)],
    "test_diseased": [("test/diseased", 1)],
    "unlabelled": [("train/unlabelled", -1)],  # semi-supervised methods (SAGAN): label -1 = unknown, never read
}


TEMPORARY_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", ".bak")
"""Suffixes of temporary and partial files (downloads, editors, atomic writes), never listed as images."""


def _skip_reason(p: Path) -> str | None:
    """Why the directory entry ``p`` is not an image, ``None`` when it is one (sub-folders are handled by the caller).

    An image is a regular file (or a link to one) with a suffix of ``IMAGE_SUFFIXES`` or, whatever its suffix,
    with the DICOM preamble (``DICM`` at byte 128; PACS exports name files ``IM0001`` or by their UID).
    """
    name = p.name
    if name.startswith("."):
        return "hidden file"
    low = name.lower()
    if low.endswith("~") or low.startswith("~$") or low.endswith(TEMPORARY_SUFFIXES):
        return "temporary file"
    if p.is_symlink() and not p.exists():
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        return f"broken symbolic link (its target '{target}' does not exist)"
    if not p.is_file():
        return "not a regular file"
    try:
        image_format(p)  # a known suffix, or the DICOM preamble
        return None
    except OSError as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    except CXRReadError:
        pass
    suffix = "".join(p.suffixes[-2:]) if low.endswith(".gz") else p.suffix
    if not suffix:
        return "no image suffix and no DICOM preamble ('DICM' at byte 128)"
    return f"unsupported suffix '{suffix}' and no DICOM preamble"


def scan_folder(folder, recursive: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Images in ``folder`` and every entry that is not one, with the reason: nothing is dropped silently.

    Args:
        folder: the folder to scan.
        recursive: also scan sub-folders (following links to folders, each real folder once); default
            ``False``: sub-folders are reported as skipped.

    Returns:
        ``(images, skipped)``: the image files sorted by path (see ``_skip_reason`` for what counts as an
        image: a known suffix, or the DICOM preamble whatever the suffix), and ``(path, reason)`` for each
        other entry, sorted by path. Reasons: ``hidden file``/``hidden folder``, ``temporary file``,
        ``sub-folder (not scanned: recursive=False)``, ``broken symbolic link ...``, ``unsupported suffix
        '.webp' ...``, ``no image suffix and no DICOM preamble ...``, ``not a regular file``, ``cannot be read
        ...``, ``folder already scanned (link loop)``. WebP and other formats are not supported (convert them
        to PNG): they are reported, not listed.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder not found: '{folder}'")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: '{folder}'")
    images: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen = {folder.resolve()}
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = list(current.iterdir())
        except OSError as e:
            skipped.append((current, f"folder cannot be read ({type(e).__name__}: {e})"))
            continue
        for p in entries:
            if p.is_dir():
                if p.name.startswith("."):
                    skipped.append((p, "hidden folder"))
                elif not recursive:
                    skipped.append((p, "sub-folder (not scanned: recursive=False)"))
                elif p.resolve() in seen:
                    skipped.append((p, "folder already scanned (link loop)"))
                else:
                    seen.add(p.resolve())
                    pending.append(p)
                continue
            reason = _skip_reason(p)
            if reason is None:
                images.append(p)
            else:
                skipped.append((p, reason))
    return sorted(images), sorted(skipped)


_QUIET_REASONS = ("hidden file", "hidden folder", "temporary file")


def list_images(folder, recursive: bool = False) -> list[Path]:
    """Image files in ``folder``, sorted by path; only the folder itself unless ``recursive`` (default ``False``).

    See :func:`scan_folder`, which also returns the skipped entries with their reasons. Here skipped
    entries are logged: hidden and temporary files at DEBUG level, the others (sub-folders, broken links,
    unsupported formats, ...) as one WARNING naming them.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is not a folder.
    """
    images, skipped = scan_folder(folder, recursive=recursive)
    quiet = [(p, r) for p, r in skipped if r in _QUIET_REASONS]
    loud = [(p, r) for p, r in skipped if r not in _QUIET_REASONS]
    if quiet:
        logger.debug("%s: skipped %d hidden/temporary file(s): %s", folder, len(quiet), [p.name for p, _ in quiet])
    if loud:
        shown = "; ".join(f"'{p.name}': {r}" for p, r in loud[:5]) + (f"; ... {len(loud) - 5} more" if len(loud) > 5
                                                                       else "")
        logger.warning("%s: %d entr%s not listed as images: %s (image suffixes: %s, or DICOM by its preamble)", folder,
                       len(loud), "y" if len(loud) == 1 else "ies", shown, " ".join(IMAGE_SUFFIXES))
    return images


def _mask_for(root: Path, sub: str, image: Path) -> str | None:
    gt_dir = root / "ground_truth" / Path(sub).name
    if not gt_dir.is_dir():
        return None
    for cand in (gt_dir / image.name, *(gt_dir / (image.stem + s) for s in (".png", ".nii.gz", ".nii"))):
        if cand.is_file():
            return str(cand)
    return None


def discover_folder(root, split: str = "train") -> list[dict]:
    """Data dicts of one split (``train``, ``test``, ``test_healthy``, ``test_diseased``) of a folder dataset."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset folder not found: '{root}'. Expected {root}/train/healthy, {root}/test/healthy and "
            f"{root}/test/diseased (see docs/data.md). For the demo phantoms run "
            f"'python -m scripts.data.phantoms --out {root}' first."
        )
    items = []
    for sub, label in SPLITS[split]:
        folder = root / sub
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder '{root}' has no '{sub}' folder (needed for split '{split}')")
        for p in list_images(folder):
            item = {"image": str(p), "label": label, "split": split, "name": p.name}
            mask = _mask_for(root, sub, p) if label == 1 else None
            if mask is not None:
                item["gt_mask"] = mask
            items.append(item)
    if not items:
        raise FileNotFoundError(f"no images found for split '{split}' under '{root}' (suffixes {IMAGE_SUFFIXES})")
    logger.info("%s: %d images for split '%s' (%d with lesion masks)", root, len(items), split,
                sum("gt_mask" in i for i in items))
    return items


def discover_csv(csv_path, split: str | None = None) -> list[dict]:
    """Data dicts from a CSV with columns ``image,label[,mask][,split]``; optional filter on ``split``.

    Rows whose ``split`` is empty (or a CSV without a ``split`` column) match every ``split`` filter, with one
    exception: an anomaly detector trains on normal images only, so for ``split="train"`` a row with label 1
    and no split is never returned: the CSV is refused (ValueError naming the CSV, the number of such rows and
    their first lines) rather than training on abnormal images. Give such rows ``split=test``.

    Raises:
        FileNotFoundError: the CSV, an image or a mask file does not exist.
        ValueError: a column is missing, a label is invalid, no row matches, or (``split="train"``) rows with
            label 1 have no split.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"dataset CSV not found: '{csv_path}'")
    items, unsplit_abnormal = [], []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {sorted(missing)}; need image,label[,mask][,split]")
        for line, row in enumerate(reader, start=2):
            if split is not None and row.get("split") not in (None, "", split):
                continue
            image = (csv_path.parent / row["image"]).resolve() if row["image"] else None
            if image is None or not image.is_file():
                raise FileNotFoundError(f"{csv_path}:{line}: image file not found: '{row['image']}'")
            try:
                label = int(row["label"])
            except ValueError:
                raise ValueError(f"{csv_path}:{line}: label must be 0 or 1, got {row['label']!r}") from None
            unlabelled = row.get("split") == "unlabelled"
            if label not in ((-1,) if unlabelled else (0, 1)):
                need = "-1 (unknown) in split 'unlabelled'" if unlabelled else "0 or 1"
                raise ValueError(f"{csv_path}:{line}: label must be {need}, got {label}")
            if split == "train" and label == 1 and not row.get("split"):
                unsplit_abnormal.append(line)
                continue
            mask = (row.get("mask") or "").strip()
            mask_path = (csv_path.parent / mask).resolve() if mask else None
            if mask_path is not None and not mask_path.is_file():
                raise FileNotFoundError(f"{csv_path}:{line}: mask file not found: '{mask}'")
            item = {"image": str(image), "label": label, "split": row.get("split") or split or "", "name": image.name}
            if mask_path is not None:
                item["gt_mask"] = str(mask_path)
            items.append(item)
    if unsplit_abnormal:
        n, shown = len(unsplit_abnormal), ", ".join(map(str, unsplit_abnormal[:5]))
        raise ValueError(
            f"{csv_path}: {n} row(s) with label 1 (abnormal) have no split (line(s) {shown}"
            f"{', ...' if n > 5 else ''}); training uses normal images only, so they cannot go into split 'train'. "
            "Add a 'split' column (train/test) and give abnormal rows split 'test'.")
    if not items:
        raise ValueError(f"{csv_path}: no rows" + (f" for split '{split}'" if split else ""))
    return items


def discover(source, split: str = "train") -> list[dict]:
    """Data dicts from a dataset folder or a CSV file (chosen by what ``source`` is)."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return discover_csv(source, split=None if split == "all" else split)
    return discover_folder(source, split)


def discover_unlabelled(source) -> list[dict]:
    """Unlabelled images for semi-supervised methods (SAGAN's ``x_u``), from ``source``:

    a dataset CSV (rows of split ``unlabelled``), a dataset folder with ``train/unlabelled/``, or a plain
    folder of images (all of them). Labels are never read; every item has label -1.

    Raises:
        FileNotFoundError: ``source`` does not exist or holds no image.
    """
    source = Path(source)
    if source.suffix.lower() == ".csv":
        items = [r for r in discover_csv(source) if r["split"] == "unlabelled"]
        if not items:
            raise FileNotFoundError(f"{source}: no rows of split 'unlabelled'")
        return items
    if (source / "train" / "unlabelled").is_dir():
        return discover_folder(source, "unlabelled")
    if not source.is_dir():
        raise FileNotFoundError(f"unlabelled images not found: '{source}' is neither a dataset CSV nor a folder")
    items = [{"image": str(p), "label": -1, "split": "unlabelled", "name": p.name} for p in list_images(source)]
    if not items:
        raise FileNotFoundError(f"no unlabelled images in '{source}' (expected {source}/train/unlabelled/ or images "
                                f"with suffixes {IMAGE_SUFFIXES}); for ZhangLab, re-run python -m scripts.data.convert")
    return items


def evenly_spaced(n_items: int, n: int) -> list[int]:
    """``n`` indices into ``n_items`` sorted items at evenly spaced positions (from 0); all of them when fewer."""
    if n >= n_items:
        return list(range(n_items))
    step = n_items / n
    return [int(i * step) for i in range(n)]


def split_holdout(items: list[dict], fraction: float = 0.1, minimum: int = 1) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, holdout) split: every k-th item by sorted name goes to the hold-out set."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    if len(items) < 2:
        raise ValueError(f"need at least 2 images to hold some out for validation, got {len(items)}")
    n_hold = min(len(items) - 1, max(minimum, round(len(items) * fraction)))
    hold_idx = set(evenly_spaced(len(items), n_hold))
    train = [it for i, it in enumerate(items) if i not in hold_idx]
    hold = [it for i, it in enumerate(items) if i in hold_idx]
    return train, hold
