"""Hardening of training: config checks up front, unreadable images left out, non-finite losses and weights
stopped, checkpoints written atomically and resumed from the newest one that loads.

- Config checks (one documented function per rule, called from ``configs/train.json`` before anything is
  built): :func:`check_learning_rate`, :func:`check_image_size`, :func:`check_on_bad_image`, all three in
  :func:`check_training_config`.
- Bad images: :func:`screen_split` runs the deterministic transforms (load, lung segmentation, intensity) of
  every training and validation item once, leaves out (``on_bad_image="skip"``) or stops at
  (``"error"``) the items whose transforms raise, and keeps the outputs so that
  :class:`ScreenedCacheDataset` caches them without running the transforms again.
- Non-finite values: :func:`check_finite_terms` (a training step's loss terms) and :func:`check_finite_weights`
  (a module before it is written to disk) raise :class:`NonFiniteError`.
- Checkpoint files: :class:`AtomicDiskSaver` (ignite save handler: temporary file + ``fsync`` + ``os.replace``,
  old files removed only after the new one is complete, optionally staged until :meth:`AtomicDiskSaver.commit`),
  :func:`atomic_torch_save` (the same write for any other ``torch.save``),
  :func:`checkpoint_candidates` / :func:`load_newest_checkpoint` (newest first, unreadable ones set aside).
"""

from __future__ import annotations

import errno
import logging
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path

import torch
from ignite.handlers import DiskSaver
from monai.data import CacheDataset
from monai.transforms import Compose, RandomizableTrait, Transform, convert_to_contiguous

from custom_transforms.io import TEMP_SUFFIX, CXRReadError, replace_synced, temp_path
from custom_transforms.utils import Choice
from scripts.networks import unwrap

logger = logging.getLogger(__name__)

__all__ = [
    "ON_BAD_IMAGE", "check_on_bad_image", "check_learning_rate", "check_image_size", "check_training_config",
    "BadImageError", "ScreenedItems", "screen_items", "screen_split", "n_bad_images", "ScreenedCacheDataset",
    "NonFiniteError", "check_finite_terms", "check_finite_weights",
    "AtomicDiskSaver", "atomic_torch_save", "checkpoint_candidates", "load_newest_checkpoint",
    "remove_stale_temp_files",
]

# ----------------------------------------------------------------------------------------- config checks

ON_BAD_IMAGE = ("skip", "error")
check_on_bad_image = Choice("hparams#on_bad_image", ON_BAD_IMAGE, "what to do with an unreadable image")
check_on_bad_image.__doc__ = """``hparams#on_bad_image``: ``"skip"`` or ``"error"``.

Raises:
    ValueError: any other value; the message names the key and the allowed values.
"""


def check_learning_rate(value, key: str = "hparams#learning_rate") -> float:
    """``value`` as a float if it is a finite number > 0 (a numeric string, as the command line may pass, counts).

    Raises:
        ValueError: not a number, NaN, infinite, zero or negative; the message names ``key`` and the value.
    """
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{key} must be a finite number > 0, got {value!r}") from None
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    if not math.isfinite(float(number)) or number <= 0:
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return float(number)


def _stride_factor(strides) -> int:
    """The size an input must be a multiple of: per spatial dimension the product of the strides, then their lcm."""
    per_dim: list[int] = []
    for s in strides:
        s = [int(x) for x in s] if isinstance(s, Sequence) else [int(s)]
        if len(per_dim) < len(s):
            per_dim += [1] * (len(s) - len(per_dim))
        for i in range(len(per_dim)):
            per_dim[i] *= s[i] if len(s) > 1 else s[0]
    return math.lcm(*per_dim) if per_dim else 1


def check_image_size(image_size, network, key: str = "hparams#image_size"):
    """``image_size`` unchanged if the network can take it.

    Only a MONAI ``UNet`` (also inside DDP) is checked: its skip connections need an input size divisible by
    the product of its strides (16 for ``network_strides [2, 2, 2, 2]``). Other networks (AnatPaste's ResNet,
    SAGAN's generator) and non-integer sizes (rejected by the loader with their own message) pass through.

    Raises:
        ValueError: not divisible; the message names the divisor, the strides and the nearest valid sizes, e.g.
            ``image_size 250 is not divisible by 16 (the product of network_strides [2, 2, 2, 2]); nearest valid
            sizes: 240, 256``.
    """
    from monai.networks.nets import UNet

    net = unwrap(network) if isinstance(network, torch.nn.Module) else network
    if not isinstance(net, UNet) or isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        return image_size
    factor = _stride_factor(net.strides)
    if image_size % factor:
        lower = image_size // factor * factor
        nearest = [s for s in (lower, lower + factor) if s > 0]
        strides = [list(s) if isinstance(s, Sequence) else s for s in net.strides]
        raise ValueError(f"{key.split('#')[-1]} {image_size} is not divisible by {factor} (the product of "
                         f"network_strides {strides}); nearest valid sizes: {', '.join(map(str, nearest))}")
    return image_size


def check_training_config(hparams: Mapping, network=None) -> Mapping:
    """Run every check of this module on a training config's ``hparams`` (and its network); return ``hparams``.

    Called from ``configs/train.json`` (``initialize`` and the trainer's ``_requires_``) so a bad value stops the
    run before any data is read.

    Raises:
        ValueError: from :func:`check_learning_rate`, :func:`check_image_size` or :func:`check_on_bad_image`.
    """
    if "learning_rate" in hparams:
        check_learning_rate(hparams["learning_rate"])
    if network is not None and "image_size" in hparams:
        check_image_size(hparams["image_size"], network)
    check_on_bad_image(hparams.get("on_bad_image", "skip"))
    return hparams


# ------------------------------------------------------------------------------------------- bad images

class BadImageError(ValueError):
    """An image whose deterministic transforms raise, with ``on_bad_image="error"`` (or none usable at all)."""

    def __init__(self, message: str, path: str = "", reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason


class ScreenedItems(list):
    """The usable items of a split (a plain list of its data dicts) and what screening found.

    Attributes:
        bad: ``[(file, reason), ...]``, the items left out.
        transform: the ``Compose`` the items went through.
        outputs: ``{index in this list: transform output}``, kept for :class:`ScreenedCacheDataset`.
    """

    def __init__(self, items=(), bad=(), transform=None, outputs=None):
        super().__init__(items)
        self.bad, self.transform, self.outputs = list(bad), transform, dict(outputs or {})

    def take_output(self, index: int):
        """The kept output of item ``index`` (once; None when not kept)."""
        return self.outputs.pop(index, None)

    def release(self) -> None:
        """Drop the kept outputs (after the cache took what it needs)."""
        self.outputs.clear()


MAX_REASON = 500  # characters of an error message kept in a log line or a scores.csv row


def failure_reason(exc: BaseException) -> str:
    """A transform failure in one line: the reader's reason (:class:`CXRReadError`) or the innermost error of the
    chain (MONAI wraps errors in ``RuntimeError: applying transform ...``, which says nothing), at most
    :data:`MAX_REASON` characters. Used by the training data check and by inference's skipped rows."""
    chain, e = [], exc
    while e is not None and all(e is not x for x in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    read = next((x for x in chain if isinstance(x, CXRReadError)), None)
    if read is not None:
        text = read.reason
    elif isinstance(chain[-1], FileNotFoundError):
        text = "file not found"
    else:
        inner = chain[-1]
        text = f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _item_file(item, image_key: str) -> str:
    return str(item.get(image_key, item)) if isinstance(item, Mapping) else str(item)


def screen_items(items: Sequence, transform, on_bad_image: str = "skip", what: str = "training",
                 num_workers: int = 0, keep_outputs: float = 1.0, image_key: str = "image") -> ScreenedItems:
    """Run the deterministic ``transform`` on every item once; return the items it works on.

    Each failure is logged as one warning naming the file and the reason; with ``on_bad_image="error"`` the
    first failure (in item order) raises instead. The outputs of the first ``keep_outputs`` share of the items
    are kept (``ScreenedItems.outputs``) for :class:`ScreenedCacheDataset` (``cache_rate``: the same share).

    Args:
        items: data dicts (``{"image": path, ...}``).
        transform: a ``Compose`` (or a list of transforms) without random transforms.
        on_bad_image: ``"skip"`` or ``"error"``.
        what: the split's name for the messages (``"training"``, ``"validation"``).
        num_workers: threads (0: in this thread), as MONAI's ``CacheDataset``.
        keep_outputs: share of the items whose outputs are kept (0: none, 1: all).
        image_key: the key holding the file name.

    Raises:
        BadImageError: ``on_bad_image="error"`` and an item fails (message: split, file, reason), or every item
            fails.
        ValueError: ``on_bad_image`` is not ``"skip"`` or ``"error"``.
    """
    mode = check_on_bad_image(on_bad_image)
    items = list(items)
    compose = transform if isinstance(transform, Compose) else Compose(list(transform))
    n_keep = int(len(items) * float(keep_outputs))

    def run(index: int):
        try:
            return compose(items[index], threading=True), None
        except Exception as e:  # noqa: BLE001 - any failure of an image's own transforms is a bad image
            return None, e

    good, bad, outputs = [], [], {}

    def collect(results) -> None:
        for index, (out, err) in enumerate(results):  # in item order; outputs not kept are dropped at once
            if err is None:
                if len(good) < n_keep:
                    outputs[len(good)] = out
                good.append(items[index])
                continue
            file, reason = _item_file(items[index], image_key), failure_reason(err)
            if mode == "error":
                raise BadImageError(f"{what} image '{file}' cannot be used: {reason} (hparams#on_bad_image='error'; "
                                    "fix or remove the file, or set it to 'skip' to leave such images out)",
                                    file, reason) from err
            logger.warning("%s data: leaving out '%s': %s", what, file, reason)
            bad.append((file, reason))

    if num_workers and num_workers > 0 and len(items) > 1:
        with ThreadPool(int(num_workers)) as pool:
            collect(pool.imap(run, range(len(items))))
    else:
        collect(map(run, range(len(items))))
    if items and not good:
        file, reason = bad[0]
        raise BadImageError(f"no usable {what} images: all {len(items)} failed to load or preprocess "
                            f"(first: '{file}': {reason})", file, reason)
    return ScreenedItems(good, bad, compose, outputs)


def screen_split(split: Sequence[Sequence], transform, on_bad_image: str = "skip", num_workers: int = 0,
                 keep_outputs: Sequence[float] = (1.0, 1.0), names: Sequence[str] = ("training", "validation"),
                 image_key: str = "image") -> tuple[ScreenedItems, ...]:
    """:func:`screen_items` on each part of a ``(train, validation)`` split, then one log line with the count.

    The split itself is made before screening, so leaving an image out never moves another one between
    training and validation.

    Raises:
        BadImageError, ValueError: as :func:`screen_items`.
    """
    parts = tuple(screen_items(items, transform, on_bad_image, what, num_workers, keep, image_key)
                  for items, what, keep in zip(split, names, keep_outputs))
    n_bad, n_all = n_bad_images(parts), sum(len(p) + len(p.bad) for p in parts)
    if n_bad:
        logger.warning("data check: %d of %d images left out (unreadable or failing preprocessing; "
                       "hparams#on_bad_image='skip'); n_bad_images=%d", n_bad, n_all, n_bad)
    else:
        logger.info("data check: all %d images usable (n_bad_images=0)", n_all)
    return parts


def n_bad_images(split) -> int:
    """Number of items screening left out of the parts of ``split`` (0 for unscreened lists)."""
    return sum(len(getattr(part, "bad", ())) for part in split)


def _first_random(transform: Compose):
    return transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))


class ScreenedCacheDataset(CacheDataset):
    """MONAI ``CacheDataset`` that takes the outputs :func:`screen_items` kept instead of recomputing them.

    With ``data`` a :class:`ScreenedItems` whose ``transform`` is the start of this dataset's ``transform``
    (the same transform objects), the cache of item ``i`` is the kept output run through the remaining
    cacheable transforms; without a kept output (or with other data) it behaves as ``CacheDataset``.
    """

    def set_data(self, data: Sequence) -> None:
        super().set_data(data)
        if isinstance(data, ScreenedItems):
            data.release()

    def _screened_prefix(self) -> int:
        """How many leading transforms of ``self.transform`` the screening already ran (0: not reusable)."""
        screened = getattr(self.data, "transform", None)
        if not isinstance(screened, Compose) or not isinstance(self.transform, Compose):
            return 0
        done, ours = list(screened.transforms), list(self.transform.transforms)
        if len(done) > len(ours) or any(a is not b for a, b in zip(done, ours)):
            return 0
        return len(done)

    def _load_cache_item(self, idx: int):
        out = self.data.take_output(idx) if isinstance(self.data, ScreenedItems) else None
        start = self._screened_prefix() if out is not None else 0
        end = _first_random(self.transform) if start else None
        if out is None or not start or (end is not None and end < start):
            return super()._load_cache_item(idx)
        item = self.transform(out, start=start, end=end, threading=True)
        if self.as_contiguous:
            item = convert_to_contiguous(item, memory_format=torch.contiguous_format)
        return item


# ------------------------------------------------------------------------------------- non-finite values

class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weights."""


def check_finite_terms(terms: Mapping, engine=None, what: str = "loss", before_step: bool = True) -> None:
    """Raise if a loss term is NaN or infinite; a training step calls it before the optimiser step that would
    spread the NaN into the weights (``before_step``), a handler after the iteration.

    Raises:
        NonFiniteError: the message names the epoch and iteration (from ``engine.state``), every term and the
            learning rate.
    """
    values = {}
    for k, v in terms.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            v = v.detach().float().item()
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            values[k] = float(v)
    if all(math.isfinite(v) for v in values.values()):
        return
    where, hint = "", ""
    if engine is not None:
        state = engine.state
        where = f" at epoch {state.epoch}, iteration {state.iteration}"
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and optimizer.param_groups:
            hint = f"; learning rate {optimizer.param_groups[0].get('lr')!r}: lower hparams#learning_rate"
    listed = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    stopped = "before the optimiser step" if before_step else "after this iteration"
    raise NonFiniteError(f"training diverged: non-finite {what}{where} ({listed}){hint}. Stopped {stopped}; "
                         "no checkpoint or model.pt was written for this epoch")


def check_finite_weights(objects: Mapping | torch.nn.Module, where: str) -> None:
    """Raise if a floating-point tensor in the ``state_dict`` of a module in ``objects`` is NaN or infinite.

    Raises:
        NonFiniteError: the message names ``where`` (the file about to be written) and the first bad tensor.
    """
    modules = {"model": objects} if isinstance(objects, torch.nn.Module) else objects
    for name, obj in modules.items():
        if not isinstance(obj, torch.nn.Module):
            continue
        for key, t in unwrap(obj).state_dict().items():
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"refusing to write {where}: '{name}' has non-finite values in '{key}' "
                                     "(training diverged)")


# ------------------------------------------------------------------------------------- checkpoint files

def _write_temp(obj, path: Path, **kwargs) -> Path:
    """``torch.save`` ``obj`` to the temporary file of ``path`` (``.<name>.<pid>.tmp``), flushed to disk; return it.
    Nothing is left behind if the write fails."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f, **kwargs)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj, path)`` as :class:`AtomicDiskSaver` writes: temporary file in the same folder (named so
    that :func:`remove_stale_temp_files` finds it after a kill), ``fsync``, ``os.replace``; missing parent folders
    are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_synced(_write_temp(obj, path), path)


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that never leaves a partial file or no file behind.

    Each file is written to a hidden temporary file in the same folder (``.<name>.<pid>.tmp``, created with the
    permissions of any new file, i.e. the umask), flushed to disk and renamed over the target with ``os.replace``.
    ignite's ``Checkpoint`` removes the old file *before* it saves the new one; here a removal waits until the
    next file is complete. ``filename`` fixes the name of every file (``model.pt``), as MONAI's
    ``CheckpointSaver``. With ``stage=True`` a written file stays in its temporary file until :meth:`commit`
    (or is dropped by :meth:`discard`), so that a caller can write another file first.

    Writes go through ``DiskSaver._save_func`` (non-atomic mode, with this class's writer), so tools that
    watch ignite's saves still see each file once.
    """

    def __init__(self, dirname, filename: str | None = None, stage: bool = False, **kwargs):
        super().__init__(dirname, atomic=False, create_dir=True, require_empty=False, **kwargs)
        self.filename, self.stage = filename, stage
        self.pending_removals: list[str] = []
        self.staged: list[tuple[Path, Path]] = []
        self.last_file: Path | None = None  # the file (or staged temporary file) written last

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        import ignite.distributed as idist

        if self.save_on_rank != idist.get_rank():
            return
        path = self.dirname / (self.filename or filename)
        self._save_func(checkpoint, path, self._write)

    def _write(self, checkpoint, path, **kwargs) -> None:
        path = Path(path)
        self.discard()  # an older staged version of a file is superseded
        tmp = _write_temp(checkpoint, path, **kwargs)
        self.last_file = tmp
        if self.stage:
            self.staged.append((tmp, path))
        else:
            self._replace(tmp, path)

    def _replace(self, tmp: Path, path: Path) -> None:
        replace_synced(tmp, path)
        self.last_file = path
        keep = path.name
        for name in self.pending_removals:
            if name != keep:
                (self.dirname / name).unlink(missing_ok=True)
        self.pending_removals = []

    def commit(self) -> list[Path]:
        """Move the staged files into place (then remove the files superseded by them); return their paths."""
        done = []
        for tmp, path in self.staged:
            if tmp.exists():
                self._replace(tmp, path)
                done.append(path)
        self.staged = []
        return done

    def discard(self) -> None:
        """Drop the staged files."""
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged = []

    def remove(self, filename: str) -> None:
        name = self.filename or filename
        if name not in self.pending_removals:
            self.pending_removals.append(name)


def checkpoint_candidates(ckpt_dir, prefix: str = "train") -> list[Path]:
    """``<prefix>_checkpoint*.pt`` files in ``ckpt_dir``, newest first (by the epoch or iteration number in the
    name, then modification time)."""

    def order(p: Path):
        m = re.search(r"=(\d+)\.pt$", p.name)
        return (int(m.group(1)) if m else -1, p.stat().st_mtime)

    files = [p for p in Path(ckpt_dir).glob(f"{prefix}_checkpoint*.pt") if p.is_file()]
    return sorted(files, key=order, reverse=True)


def load_newest_checkpoint(ckpt_dir, prefix: str = "train", set_aside: bool = True):
    """The newest training checkpoint that loads: ``(path, content)``, or ``(None, None)``.

    A file that fails to load (empty, truncated, not a checkpoint) is logged and, with ``set_aside``, renamed to
    ``<name>.unreadable`` so that it is not tried again and no later save can be confused with it.
    """
    for path in checkpoint_candidates(ckpt_dir, prefix):
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(content, Mapping):
                raise ValueError(f"expected a dict of states, got {type(content).__name__}")
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped
            size = path.stat().st_size if path.exists() else 0
            logger.warning("checkpoint '%s' (%d bytes) cannot be loaded (%s: %s); trying an older one",
                           path, size, type(e).__name__, str(e)[:200])
            if set_aside:
                aside = path.with_name(path.name + ".unreadable")
                os.replace(path, aside)
                logger.warning("renamed it to '%s'", aside.name)
            continue
        return path, content
    return None, None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete the temporary files an atomic write (:class:`AtomicDiskSaver`, :func:`atomic_torch_save`,
    ``custom_transforms.io.atomic_write_bytes``) left in ``folder`` when its process was killed
    (``.<name>.<pid>.tmp`` whose process is gone); return them."""
    removed = []
    for p in Path(folder).glob(f".*.*{TEMP_SUFFIX}"):
        m = re.fullmatch(rf"\..+\.(\d+){re.escape(TEMP_SUFFIX)}", p.name)
        if m and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        logger.info("removed %d partial file(s) of a killed run: %s", len(removed), [p.name for p in removed])
    return removed
