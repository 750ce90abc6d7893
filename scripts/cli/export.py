"""Export a trained model to TorchScript (``models/model.ts``), whatever override files it was trained with.

Usage::

    python -m scripts.cli.export [--bundle_root .] [--config_file FILE ...]

Training writes ``models/model_config.json`` beside ``model.pt`` (:func:`scripts.tracking.model_record`): an
override of ``configs/inference.json`` with the trained network sizes, intensity transforms and, for a model family,
its network. The export builds ``network_def`` from ``configs/inference.json`` + that record (+ the given files,
merged last), loads ``model.pt`` into it strictly (a weight that does not fit is an error, never skipped), writes
``model.ts`` with MONAI's ``ckpt_export`` (``metadata.json`` and each config file embedded, under its name) through
a temporary file, and checks that ``model.ts`` equals the network on a random input. A problem is one line
``error: ...`` (exit code 2); when the weights do not fit, it names the override files of ``configs/`` they fit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from scripts.tracking import RECORD_NAME

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the bundle root this module belongs to

__all__ = ["ExportError", "export", "export_torchscript", "config_list", "main", "run_or_explain", "write_random_model"]


class ExportError(Exception):
    """A problem with the inputs, reported as one line by the command line."""


def _rel(path: Path, root: Path) -> str:
    path = Path(path)
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def read_json(path: Path, what: str = "config file") -> dict:
    """The JSON object in ``path``.

    Raises:
        ExportError: the file is missing or not a JSON object.
    """
    if not Path(path).is_file():
        raise ExportError(f"{what} {path} does not exist")
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ExportError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def config_list(bundle_root, config_file=(), source=SOURCE_ROOT) -> list[Path]:
    """``<source>/configs/inference.json``, the record ``<bundle_root>/models/model_config.json`` when present, and
    ``config_file`` (merged in that order); each checked to be a JSON object."""
    record = Path(bundle_root) / "models" / RECORD_NAME
    files = [Path(source) / "configs" / "inference.json", *([record] if record.is_file() else []),
             *(Path(c) for c in config_file)]
    for f in files:
        read_json(f, "the record" if f == record else "config file")
    return files


def load_weights(ckpt: Path, key_in_ckpt: str | None = None) -> dict:
    """The state dict in ``ckpt`` (under ``key_in_ckpt`` when given).

    Raises:
        ExportError: the file is missing, not a weights file, or lacks ``key_in_ckpt``.
    """
    import torch

    if not Path(ckpt).is_file():
        raise ExportError(f"no trained model: {ckpt} does not exist")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{Path(ckpt).name} is not a readable weights file: {type(e).__name__}: {e}") from e
    if key_in_ckpt:
        if not isinstance(state, dict) or key_in_ckpt not in state:
            raise ExportError(f"{Path(ckpt).name} has no key {key_in_ckpt!r} (--key_in_ckpt)")
        state = state[key_in_ckpt]
    if not isinstance(state, dict):
        raise ExportError(f"{Path(ckpt).name} holds a {type(state).__name__}, not a state dict")
    return state


def _parser(configs, meta=None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    if meta is not None:
        parser.read_meta(str(meta))
    return parser


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def first_difference(state: dict, net) -> str:
    """The first weight in which ``state`` and ``net`` differ, in words."""
    have, want = _shapes(state), _shapes(net.state_dict())
    for k in list(want) + [k for k in have if k not in want]:
        if have.get(k) != want.get(k):
            a = list(have[k]) if k in have else "nothing"
            b = list(want[k]) if k in want else "nothing"
            return f"'{k}': {a} in the weights, {b} in the network"
    return "no shape differs"


def fitting_overrides(state: dict, source=SOURCE_ROOT) -> list[list[str]]:
    """The shortest lists of override files of ``configs/`` (``overrides/``, ``methods/inference/``, a model
    family's inference file followed by an override) whose network, merged over ``inference.json``, fits ``state``."""
    configs = Path(source) / "configs"
    inference = configs / "inference.json"
    overrides = sorted((configs / "overrides").glob("*.json"))
    families = sorted((configs / "methods" / "inference").glob("*.json"))
    want = _shapes(state)
    found: list[list[str]] = []
    for combo in [[f] for f in overrides + families] + [[fam, o] for fam in families for o in overrides]:
        if found and len(combo) > len(found[0]):
            break
        try:
            net = _parser([inference, *combo]).get_parsed_content("network_def")
        except Exception:  # noqa: BLE001 - a combination that does not build is not the one
            continue
        if _shapes(net.state_dict()) == want:
            found.append([_rel(c, source) for c in combo])
    return found


def _names(configs, source) -> str:
    return " + ".join(_rel(c, source) for c in configs)


def build_strict(configs: list[Path], state: dict, ckpt_name: str = "model.pt", source=SOURCE_ROOT,
                 meta: Path | None = None):
    """The parser of ``configs`` and its ``network_def`` with ``state`` loaded strictly.

    Raises:
        ExportError: ``state`` does not fit; the message names the override files of ``configs/`` it fits.
    """
    parser = _parser(configs, meta)
    try:
        net = parser.get_parsed_content("network_def")
    except Exception as e:
        raise ExportError(f"network_def of {_names(configs, source)} does not build: {' '.join(str(e).split())}") \
            from e
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        has_record = any(Path(c).name == RECORD_NAME for c in configs)
        why = "" if has_record else f" (no models/{RECORD_NAME}: a model trained before training recorded it, " \
                                    "or copied without it)"
        fits = fitting_overrides(state, source)
        if fits:
            hint = "it fits configs/inference.json + " + " or + ".join(" + ".join(f) for f in fits[:3]) + \
                f": pass --config_file {' '.join(fits[0])}"
        else:
            hint = "no override file of configs/ gives that network: pass the files the model was trained with " \
                   "as --config_file (command-line --hparams#... values as a \"+hparams\" file)"
        raise ExportError(f"{ckpt_name} does not fit the network of {_names(configs, source)}{why}; {hint} "
                          f"(first difference: {first_difference(state, net)})") from e
    return parser, net.eval()


def check_record(configs: list[Path], net, source=SOURCE_ROOT) -> None:
    """The record's ``trained_with`` agrees with what ``configs`` build: same network class, and the intensity
    transforms either recorded or set by a file after the record.

    Raises:
        ExportError: naming what the record could not rebuild and the file to pass.
    """
    records = [c for c in configs if Path(c).name == RECORD_NAME]
    if not records:
        return
    at = configs.index(records[-1])
    record = read_json(records[-1], "the record")
    trained = record.get("trained_with") or {}
    later = [read_json(c) for c in configs[at + 1:]]
    built = f"{type(net).__module__}.{type(net).__qualname__}"
    if trained.get("network") and trained["network"] != built and not any("network_def" in c for c in later):
        raise ExportError(f"{_rel(records[-1], source)} records the network {trained['network']}, the configs build "
                          f"{built}: pass the model family's inference override (configs/methods/inference/) as "
                          "--config_file")
    if "intensity_transforms" not in record and not any("intensity_transforms" in c for c in later):
        raise ExportError(f"the training's intensity_transforms {trained.get('intensity_transforms')} are not those "
                          f"of a file of configs/, so {_rel(records[-1], source)} leaves them out: pass the override "
                          "file that sets intensity_transforms as --config_file")


def export_torchscript(ckpt: Path, ts_path: Path, configs: list[Path], meta: Path, key_in_ckpt: str | None = None,
                       atol: float = 1e-5, source=SOURCE_ROOT) -> dict:
    """``ckpt_export`` of ``network_def`` (``configs`` and ``meta`` embedded) into ``ts_path``, checked against the
    strictly loaded network; returns the check. ``ts_path`` is only replaced once the check passed.

    Raises:
        ExportError: unreadable weights, a network they do not fit, two configs of one name, or a ``model.ts``
            that lacks an embedded file or differs from the network.
    """
    import torch
    from monai.bundle import ckpt_export

    stems: dict[str, Path] = {"metadata": Path(meta)}
    for c in configs:  # ckpt_export embeds each config under its name without extension
        if Path(c).stem in stems:
            raise ExportError(f"{c}: a config named {Path(c).stem!r} is already embedded in model.ts; rename the file")
        stems[Path(c).stem] = Path(c)
    state = load_weights(ckpt, key_in_ckpt)
    parser, net = build_strict(configs, state, Path(ckpt).name, source, meta)
    check_record(configs, net, source)

    ts_path = Path(ts_path)
    ts_path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary folder, not a temporary name: torch.jit.save names the archive's root folder after the file,
    # and MONAI Deploy's bundle operator looks for "<file stem>/extra/<config>.json" (it reads no config else)
    tmp_dir = ts_path.parent / f".export.{os.getpid()}.tmp"
    tmp_dir.mkdir(exist_ok=True)
    tmp = tmp_dir / ts_path.name
    try:
        ckpt_export(net_id="network_def", filepath=str(tmp), ckpt_file=str(ckpt), meta_file=str(meta),
                    config_file=[str(c) for c in configs], key_in_ckpt=key_in_ckpt or "")
        extra = {f"{s}.json": "" for s in stems}
        ts = torch.jit.load(str(tmp), map_location="cpu", _extra_files=extra)
        empty = [k for k, v in extra.items() if not v]
        if empty:
            raise ExportError(f"model.ts lacks the embedded files {empty}")
        fmt = parser.get("_meta_#network_data_format#inputs#image")
        size = int(parser.get_parsed_content("hparams#image_size", default=fmt["spatial_shape"][0]))
        x = torch.rand(1, fmt["num_channels"], size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y_ts, y_pt = ts(x), net(x)
        try:
            torch.testing.assert_close(y_ts, y_pt, rtol=0, atol=atol)
        except AssertionError as e:
            raise ExportError(f"model.ts differs from {Path(ckpt).name}'s network on a random input: "
                              f"{' '.join(str(e).split())}") from e
        os.replace(tmp, ts_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    flat = lambda y: [t for t in (y if isinstance(y, (tuple, list)) else [y]) if isinstance(t, torch.Tensor)]
    diff = max(((a - b).abs().max().item() for a, b in zip(flat(y_ts), flat(y_pt))), default=0.0)
    return {"input_shape": list(x.shape), "max_abs_diff": diff, "embedded": sorted(extra),
            "network": type(net).__name__}


def export(bundle_root=".", filepath=None, ckpt_file=None, config_file=(), key_in_ckpt: str | None = None,
           atol: float = 1e-5, source=SOURCE_ROOT) -> dict:
    """Export ``<bundle_root>/models/model.pt`` to ``<bundle_root>/models/model.ts`` (or ``ckpt_file`` to
    ``filepath``) with ``inference.json``, the record and ``config_file`` (:func:`config_list`); returns a summary.

    Raises:
        ExportError: see :func:`export_torchscript`; also a missing ``bundle_root`` or config file.
    """
    bundle_root = Path(bundle_root)
    if not bundle_root.is_dir():
        raise ExportError(f"--bundle_root {bundle_root} is not a folder")
    ckpt = Path(ckpt_file) if ckpt_file else bundle_root / "models" / "model.pt"
    ts_path = Path(filepath) if filepath else bundle_root / "models" / "model.ts"
    if not ckpt.is_file():
        raise ExportError(f"no trained model: {ckpt} does not exist (train first, with --bundle_root {bundle_root})")
    configs = config_list(bundle_root, config_file, source)
    meta = Path(source) / "configs" / "metadata.json"
    check = export_torchscript(ckpt, ts_path, configs, meta, key_in_ckpt, atol, source)
    return {"model_ts": str(ts_path), "model_pt": str(ckpt), "config_files": [str(c) for c in configs],
            "check": check}


def print_summary(s: dict) -> None:
    c = s["check"]
    print(f"wrote {s['model_ts']} ({c['network']}) from {s['model_pt']} with {', '.join(s['config_files'])}")
    print(f"model.ts == model.pt network on a random {tuple(c['input_shape'])} input "
          f"(max abs diff {c['max_abs_diff']:.2e}); embedded: {', '.join(c['embedded'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.cli.export", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle_root", default=".", help="folder with models/model.pt (the training's bundle_root)")
    ap.add_argument("--filepath", default=None, help="TorchScript to write (default <bundle_root>/models/model.ts)")
    ap.add_argument("--ckpt_file", default=None, help="weights (default <bundle_root>/models/model.pt)")
    ap.add_argument("--config_file", nargs="+", action="extend", default=[], metavar="FILE",
                    help="override files merged after inference.json and the record (only for what the record lacks)")
    ap.add_argument("--key_in_ckpt", default=None, help="key of the weights in a nested checkpoint")
    ap.add_argument("--atol", type=float, default=1e-5, help="tolerance of the TorchScript check")
    args = ap.parse_args(argv)
    return run_or_explain(lambda: export(args.bundle_root, args.filepath, args.ckpt_file, args.config_file,
                                         args.key_in_ckpt, args.atol), print_summary)


def write_random_model(root, config_files, seed: int = 0, export: bool = False) -> Path:
    """``root/models/model.pt`` (and with ``export``, ``model.ts`` via ``ckpt_export`` with ``config_files``
    embedded): the network of ``config_files``, untrained, with seeded random weights; returns ``root``. For tests
    and benchmarks, where speed and plumbing matter, not the weights."""
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    root, files = Path(root), [str(f) for f in (config_files if isinstance(config_files, (list, tuple))
                                                else [config_files])]
    parser = ConfigParser()
    parser.read_config(files)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    if export:
        ckpt_export(net_id="network_def", filepath=str(root / "models" / "model.ts"),
                    ckpt_file=str(root / "models" / "model.pt"),
                    meta_file=str(SOURCE_ROOT / "configs" / "metadata.json"), config_file=files)
    return root


def run_or_explain(make_summary, show) -> int:
    """The command lines' shape: ``show(make_summary())`` and exit code 0; an :class:`ExportError` is one
    ``error: ...`` line on stderr and exit code 2."""
    try:
        summary = make_summary()
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    show(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
