"""Pack a trained model as a MONAI Model Zoo style bundle zip that runs without installing this project.

Usage::

    python -m scripts.cli.pack_bundle --bundle_root <dir with models/model.pt> --out dist/art_asyn_bundle.zip \\
        [--config_file <override files for what models/model_config.json lacks> ...]

The model's configs are ``configs/inference.json``, the record training wrote beside ``model.pt``
(``models/model_config.json``: network sizes, intensity transforms, model family) and the given files, merged in
that order. The zip holds ``art_asyn_bundle/``: ``configs/`` (all of them, plus the record and given overrides from
elsewhere), ``models/model.pt``, ``models/model_config.json``, ``models/model.ts`` (``ckpt_export`` with the configs
embedded, checked against model.pt),
``docs/`` (+ ``package.md``: how to run this model), ``LICENSE``, ``large_files.yml`` (with the models' hashes)
the ``custom_transforms`` and ``scripts`` sources and ``app/`` (the MONAI Deploy application of ``bundle/app``).
Run it from the unzipped folder, or from elsewhere with the folder on ``PYTHONPATH`` (``bundle/README.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from custom_transforms.io import file_sha256
from scripts.cli import export

BUNDLE_NAME = "art_asyn_bundle"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the bundle root this module belongs to
PACKAGES = ("custom_transforms", "scripts")  # the code the configs import
DEPLOY_APP = ("bundle/app", "app")  # the MONAI Deploy application (docs/deploy.md): source, place in the zip
TOP_FILES = ("LICENSE", "large_files.yml")
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


class PackError(export.ExportError):
    """A problem with the inputs, reported as one line by the command line."""


# ------------------------------------------------------------------------------------------- file helpers

def _wanted(rel: Path) -> bool:
    parts = rel.parts
    return not (any(p in SKIP_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts)
                or rel.suffix in SKIP_SUFFIXES)


def copy_tree(src: Path, dst: Path) -> list[Path]:
    """Copy the files of ``src`` to ``dst`` without caches, compiled or hidden files; the copied files."""
    out = []
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_file() and _wanted(rel):
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            out.append(target)
    return out


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------------------------------- steps

def check_inputs(bundle_root: Path, config_files: list[Path], source: Path) -> Path:
    """Clear errors before any work; returns the checkpoint path."""
    ckpt = bundle_root / "models" / "model.pt"
    if not bundle_root.is_dir():
        raise PackError(f"--bundle_root {bundle_root} is not a folder")
    if not ckpt.is_file():
        raise PackError(f"no trained model: {ckpt} does not exist (train first, with --bundle_root {bundle_root})")
    for c in config_files:
        export.read_json(c)
    needed = [source / "configs" / "inference.json", source / "configs" / "metadata.json",
              *(source / p for p in PACKAGES), *(source / f for f in TOP_FILES), source / "docs",
              source / DEPLOY_APP[0]]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise PackError(f"the source bundle {source} lacks: {', '.join(missing)}")
    return ckpt


def place_overrides(config_files: list[Path], source: Path, configs: Path) -> list[str]:
    """Bundle paths (``configs/...``) of the given override files, copying those from outside ``configs/``."""
    src_configs = (source / "configs").resolve()
    out = []
    seen: set[Path] = set()
    for c in config_files:
        c = c.resolve()
        if c in seen:
            raise PackError(f"config file {c} is given twice")
        seen.add(c)
        if c.is_relative_to(src_configs):
            rel = Path("configs") / c.relative_to(src_configs)
        else:
            rel = Path("configs") / c.name
            target = configs.parent / rel
            if target.exists() and target.read_bytes() != c.read_bytes():
                raise PackError(f"{c} would replace the bundle's own {rel}: rename the file")
            shutil.copy2(c, target)
        out.append(rel.as_posix())
    return out


def export_torchscript(root: Path, overrides: list[str], key_in_ckpt: str | None, atol: float) -> dict:
    """``ckpt_export`` of ``network_def`` into ``models/model.ts`` (:func:`scripts.cli.export.export_torchscript`:
    weights loaded strictly, ``model.ts`` checked against them)."""
    configs = [root / "configs" / "inference.json", *(root / c for c in overrides)]
    return export.export_torchscript(root / "models" / "model.pt", root / "models" / "model.ts", configs,
                                     root / "configs" / "metadata.json", key_in_ckpt, atol, source=root)


def fill_large_files(path: Path, hashes: dict[str, str]) -> None:
    """Write the sha256 of each packed file into the ``hash_val`` of its entry (comments kept)."""
    lines, current = path.read_text().splitlines(keepends=True), None
    for i, line in enumerate(lines):
        m = re.match(r'\s*-?\s*path:\s*"?([^"\s]+)"?', line)
        if m:
            current = m.group(1)
        elif current in hashes and re.match(r"\s*hash_val:", line):
            lines[i] = re.sub(r"hash_val:.*", f'hash_val: "{hashes[current]}"', line.rstrip("\n")) + "\n"
        elif current in hashes and re.match(r"\s*hash_type:", line):
            lines[i] = re.sub(r"hash_type:.*", 'hash_type: "sha256"', line.rstrip("\n")) + "\n"
    path.write_text("".join(lines))
    import yaml  # a MONAI bundle dependency (ConfigParser reads YAML)

    entries = {e["path"]: e for e in yaml.safe_load(path.read_text())["large_files"]}
    for p, h in hashes.items():
        if entries.get(p, {}).get("hash_val") != h:
            raise PackError(f"large_files.yml has no entry for {p} to record its hash in")


# used by the bundle's tools but not listed in metadata.json: pinned to the versions that packed the bundle
TOOLS = {"fire": "the `python -m monai.bundle` command line", "jsonschema": "verify_metadata",
         "matplotlib": "evaluation figures", "PyYAML": "download_large_files"}


def pip_line(meta: dict) -> str:
    from importlib.metadata import PackageNotFoundError, version

    pins = {"monai": meta.get("monai_version"), "torch": meta.get("pytorch_version"),
            "numpy": meta.get("numpy_version"), **meta.get("required_packages_version", {})}
    for name in TOOLS:
        if name not in pins:
            try:
                pins[name] = version(name)
            except PackageNotFoundError:
                pins[name] = None
    return "pip install " + " ".join(f"{k}=={v}" if v else k for k, v in pins.items())


def write_package_doc(root: Path, overrides: list[str], check: dict, hashes: dict) -> None:
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    files = ", ".join(f"'{c}'" for c in ["configs/inference.json", *overrides])
    tools = "; ".join(f"{k}: {v}" for k, v in TOOLS.items())
    text = f"""# This package

Bundle `{BUNDLE_NAME}` version {meta.get("version")}, packed {time.strftime("%Y-%m-%d %H:%M:%S")} by
`python -m scripts.cli.pack_bundle`.

The model must be used with these config files (`model_config.json`: what it was trained with):

    --config_file "[{files}]"

Dependencies only (this folder holds the `custom_transforms` and `scripts` packages its configs import; the
pins of metadata.json, plus the versions of the tools that packed it: {tools}):

    {pip_line(meta)}

Inference, from this folder (Python puts the current folder on `sys.path`, so `scripts` is found here):

    python -m monai.bundle run inferring --config_file "[{files}]" --dataset_dir <images> --output_dir <results>

From another folder, put this folder on `PYTHONPATH` and pass it as `--bundle_root` (config paths are then
relative to the current folder, or absolute):

    PYTHONPATH=<this folder> python -m monai.bundle run inferring --bundle_root <this folder> ...

MONAI Deploy (DICOM in; DICOM SEG, Secondary Capture and SR out; `docs/deploy.md`), from this folder, after
`pip install -r app/requirements.txt`:

    PYTHONPATH=. python app -i <DICOM or image folder> -o <results> -m models/model.ts

`models/model.ts` is `ckpt_export` of `network_def` with {", ".join(check["embedded"])} embedded; it equals
`models/model.pt`'s network on a random {tuple(check["input_shape"])} input (max abs difference
{check["max_abs_diff"]:.2e}).

| file | sha256 |
| --- | --- |
""" + "".join(f"| `{p}` | `{h}` |\n" for p, h in hashes.items())
    (root / "docs" / "package.md").write_text(text)


def write_zip(stage: Path, out: Path) -> list[zipfile.ZipInfo]:
    """Zip ``stage/<name>/`` to ``out`` through a temporary file in the same folder and ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for p in sorted(stage.rglob("*")):
                    if p.is_file():
                        z.write(p, p.relative_to(stage).as_posix())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with zipfile.ZipFile(out) as z:
        bad = z.testzip()
        if bad is not None:
            raise PackError(f"{out}: {bad} is corrupt in the written zip")
        return z.infolist()


def pack_bundle(bundle_root, out, config_file=(), source=SOURCE_ROOT, key_in_ckpt: str | None = None,
                atol: float = 1e-5) -> dict:
    """Pack ``bundle_root/models/model.pt`` with the bundle at ``source`` into ``out``; returns a summary."""
    bundle_root, out, source = Path(bundle_root), Path(out), Path(source)
    record = bundle_root / "models" / export.RECORD_NAME
    config_files = [*([record] if record.is_file() else []), *(Path(c) for c in config_file)]
    ckpt = check_inputs(bundle_root, config_files, source)
    if out.suffix != ".zip":
        raise PackError(f"--out {out} must end with .zip")
    with tempfile.TemporaryDirectory(prefix="pack_bundle_") as tmp:
        root = Path(tmp) / BUNDLE_NAME
        copy_tree(source / "configs", root / "configs")
        overrides = place_overrides(config_files, source, root / "configs")
        (root / "models").mkdir()
        shutil.copy2(ckpt, root / "models" / "model.pt")
        if record.is_file():
            shutil.copy2(record, root / "models" / export.RECORD_NAME)
        check = export_torchscript(root, overrides, key_in_ckpt, atol)
        copy_tree(source / "docs", root / "docs")
        for name in TOP_FILES:
            shutil.copy2(source / name, root / name)
        for pkg in PACKAGES:
            copy_tree(source / pkg, root / pkg)
        copy_tree(source / DEPLOY_APP[0], root / DEPLOY_APP[1])
        hashes = {p: file_sha256(root / p) for p in ("models/model.pt", "models/model.ts")}
        fill_large_files(root / "large_files.yml", hashes)
        write_package_doc(root, overrides, check, hashes)
        infos = write_zip(Path(tmp), out)
    groups: dict[str, list[int]] = {}
    for i in infos:
        parts = i.filename.split("/")
        key = parts[1] + ("/" if len(parts) > 2 else "")
        groups.setdefault(key, [0, 0])
        groups[key][0] += 1
        groups[key][1] += i.file_size
    return {"zip": str(out), "size": out.stat().st_size, "n_files": len(infos), "groups": groups,
            "config_files": ["configs/inference.json", *overrides], "check": check, "hashes": hashes}


def print_summary(s: dict) -> None:
    print(f"wrote {s['zip']}: {human(s['size'])}, {s['n_files']} files in {BUNDLE_NAME}/")
    for key, (n, size) in sorted(s["groups"].items()):
        print(f"  {key:<20} {n:>4} file{'s' if n != 1 else ' '}  {human(size):>10} uncompressed")
    c = s["check"]
    print(f"model.ts == model.pt network on a random {tuple(c['input_shape'])} input "
          f"(max abs diff {c['max_abs_diff']:.2e}); embedded: {', '.join(c['embedded'])}")
    for p, h in s["hashes"].items():
        print(f"  sha256 {p}: {h}")
    files = ",".join(f"'{c}'" for c in s["config_files"])
    print(f'run from the unzipped {BUNDLE_NAME}/: python -m monai.bundle run inferring --config_file "[{files}]" '
          "--dataset_dir <images> --output_dir <results>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.cli.pack_bundle", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle_root", default=".", help="folder with models/model.pt (the training bundle_root)")
    ap.add_argument("--out", default=f"dist/{BUNDLE_NAME}.zip", help="zip to write (default: %(default)s)")
    ap.add_argument("--config_file", nargs="+", action="extend", default=[], metavar="FILE",
                    help="override files merged after inference.json and models/model_config.json (for a model "
                         "without that record, the override files it was trained with, in order)")
    ap.add_argument("--key_in_ckpt", default=None, help="key of the weights in a nested model.pt")
    ap.add_argument("--atol", type=float, default=1e-5, help="tolerance of the TorchScript check")
    args = ap.parse_args(argv)
    return export.run_or_explain(lambda: pack_bundle(args.bundle_root, args.out, args.config_file,
                                                     key_in_ckpt=args.key_in_ckpt, atol=args.atol), print_summary)


if __name__ == "__main__":
    sys.exit(main())
