"""Images/s of the MONAI Deploy app (``bundle/app``) against ``configs/inference.json`` on the same images, on CPU.

    python -m scripts.benchmarks.deploy [--images ../shared/data/cxr/nih/test/diseased] [--n 32] [--repeats 3]

Three paths, each a fresh process as a user runs it, interleaved in every repeat so machine noise hits all alike:

- ``inference.json``: ``python -m monai.bundle run inferring`` on a folder of the PNG files;
- ``deploy PNG``: ``python bundle/app -i <that folder>``;
- ``deploy DICOM``: ``python bundle/app -i <a CR study of the same images>`` (``scripts.deploy.sample_dicom``;
  also writes DICOM SEG, SC and SR per image).

The model is the default 256 px U-Net of ``configs/inference.json`` with seeded random weights (speed does not
depend on the weights), exported to ``model.ts`` with ``ckpt_export``; ``--model`` takes a bundle folder with
``models/model.ts`` instead. Each path runs on ``--n`` images and on 1 image; the report gives the median wall time
of each, ``n / wall`` (end to end) and ``(n - 1) / (wall_n - wall_1)`` (steady state: start-up and model loading
taken out), per path and as ratios to ``inference.json`` measured within the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PATHS = ("inference.json", "deploy PNG", "deploy DICOM")


def make_model(root: Path, seed: int = 0) -> Path:
    """A bundle folder with the default network (seeded random weights) as model.pt and model.ts."""
    from scripts.cli.export import write_random_model

    shutil.copytree(REPO / "configs", root / "configs")
    return write_random_model(root, [REPO / "configs" / "inference.json"], seed=seed, export=True)


def command(path: str, inp: Path, out: Path, bundle: Path, model: Path) -> list[str]:
    if path == "inference.json":
        return [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file",
                str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle), "--dataset_dir", str(inp),
                "--output_dir", str(out), "--progress_bar", "false"]
    return [sys.executable, str(REPO / "bundle" / "app"), "-i", str(inp), "-o", str(out), "-m", str(model)]


def timed(cmd: list[str], cwd: Path) -> float:
    """Wall seconds of one run; raises with the tail of its output when it fails."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmarks.deploy", description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "cxr" / "nih" / "test" / "diseased"))
    ap.add_argument("--n", type=int, default=32, help="images per timed run (default 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None,
                    help="a bundle folder with models/model.ts (default: random-weight 256 px U-Net)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from scripts.deploy.sample_dicom import images_to_study
    from scripts.inference import scan_inputs

    files = [Path(f) for f in scan_inputs(args.images)[0]][: args.n]
    if len(files) < 2:
        print(f"error: need at least 2 images in '{args.images}', found {len(files)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="deploy_bench_") as tmp:
        tmp = Path(tmp)
        bundle = Path(args.model) if args.model else make_model(tmp / "bundle")
        if not (bundle / "models" / "model.ts").is_file():
            print(f"error: --model {bundle} must be a bundle folder with models/model.ts", file=sys.stderr)
            return 2
        model = bundle / "models" / "model.ts"
        inputs = {}
        for n in (len(files), 1):
            png = tmp / f"png{n}"
            png.mkdir()
            for f in files[:n]:
                shutil.copy(f, png / f.name)
            images_to_study(files[:n], tmp / f"dicom{n}")
            inputs[n] = {"inference.json": png, "deploy PNG": png, "deploy DICOM": tmp / f"dicom{n}"}
        walls = {(p, n): [] for p in PATHS for n in inputs}
        for r in range(args.repeats):
            for n in inputs:
                for p in PATHS:
                    out = tmp / f"out_{r}_{n}_{p.replace(' ', '_').replace('.', '_')}"
                    walls[(p, n)].append(timed(command(p, inputs[n][p], out, bundle, model), tmp))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{p} {walls[(p, len(files))][-1]:.1f} s" for p in PATHS), flush=True)

    n = len(files)
    report = {"n_images": n, "repeats": args.repeats, "image_size": 256, "paths": {}}
    print(f"\n{n} images from {args.images} at 256 px, CPU threads {os.cpu_count()}, median of {args.repeats} runs")
    print(f"{'path':<16}{'wall n (s)':>12}{'wall 1 (s)':>12}{'img/s end-to-end':>18}{'img/s steady':>14}")
    for p in PATHS:
        wn, w1 = statistics.median(walls[(p, n)]), statistics.median(walls[(p, 1)])
        e2e, steady = n / wn, (n - 1) / max(wn - w1, 1e-9)
        report["paths"][p] = {"wall_n": walls[(p, n)], "wall_1": walls[(p, 1)], "img_s_end_to_end": e2e,
                              "img_s_steady": steady}
        print(f"{p:<16}{wn:>12.2f}{w1:>12.2f}{e2e:>18.2f}{steady:>14.2f}")
    for p in PATHS[1:]:  # ratios within each repeat (same machine state), then their median
        ratios = [walls[("inference.json", n)][i] / walls[(p, n)][i] for i in range(args.repeats)]
        report["paths"][p]["speed_ratio_vs_inference_json"] = ratios
        print(f"{p} / inference.json speed (end to end, per repeat): "
              + ", ".join(f"{x:.2f}x" for x in ratios) + f"; median {statistics.median(ratios):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
