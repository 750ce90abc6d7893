"""Side-by-side anomaly maps of several trained bundles on the same diseased test images.

Each row is one diseased image that has a ground-truth lesion mask: the image with the lesion outlined
in green, then, per model, the anomaly map ``|I - I_hat|`` overlaid on the image with the model's
predicted mask outlined in yellow. All models use the same preprocessing and mask rule, taken from the
configs (``configs/evaluate.json`` is appended to the list). Usage (from the repository root)::

    python -m scripts.cli.figure_anomaly_maps --dataset_dir ../shared/data/cxr/nih \\
        --config configs/train.json --config configs/overrides/cpu_budget.json \\
        --model ART-ASyn=runs/art --model baseline=runs/baseline --n 5 --out docs/figures/nih_anomaly_maps.png

``--model LABEL=BUNDLE_ROOT`` loads ``BUNDLE_ROOT/models/model.pt``. Rows are the ``--n`` diseased images
with masks, in file-name order (no cherry-picking); the column title row names the models.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from custom_transforms.utils import as_2d
from scripts.visualization import GT_RGB, draw_contours, overlay, save_grid, title_bar, to_rgb

REPO = Path(__file__).resolve().parents[2]



def load_bundle_parts(configs: list[str], dataset_dir: str, bundle_root: str):
    """(network with the bundle's best weights, preprocessing, postprocessing) of one trained bundle."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs + [str(REPO / "configs" / "evaluate.json")])
    parser.update({"bundle_root": bundle_root, "dataset_dir": dataset_dir, "device": "$torch.device('cpu')"})
    ckpt = Path(bundle_root) / "models" / "model.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no trained model at '{ckpt}' (train the bundle with --bundle_root {bundle_root})")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return net.eval(), parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")


def make_figure(configs, dataset_dir, models: dict[str, str], n: int = 5, gain: float = 4.0) -> np.ndarray:
    from scripts.data.datasets import discover

    cases = [d for d in discover(dataset_dir, "test") if d["label"] == 1 and d.get("gt_mask")][:n]
    if not cases:
        raise ValueError(f"no diseased test image with a ground-truth mask under '{dataset_dir}'")
    parts = {label: load_bundle_parts(configs, dataset_dir, root) for label, root in models.items()}
    rows = []
    for case in cases:
        panels = []
        for net, pre, post in parts.values():
            item = pre(dict(case))
            image = torch.as_tensor(item["image"])[None].float()
            with torch.no_grad():
                pred = net(image)[0]
            out = post({**item, "image": image[0], "pred": pred})
            img2d = as_2d(out["image"]).astype(np.float32)
            if not panels:
                panels.append(draw_contours(to_rgb(img2d), as_2d(item["gt_mask"]) > 0.5, GT_RGB))
            panels.append(overlay(img2d, as_2d(out["amap"]), as_2d(out["pred_mask"]), gain=gain))
        rows.append(np.concatenate(panels, axis=1))
    size = rows[0].shape[0]
    header = np.concatenate([title_bar(t, size) for t in ["image + lesion"] + list(parts)], axis=1)
    return np.concatenate([header] + rows, axis=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset_dir", required=True, help="dataset root with test/diseased and ground_truth/diseased")
    ap.add_argument("--config", action="append", required=True, help="config file(s) the models were trained with")
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=BUNDLE_ROOT")
    ap.add_argument("--n", type=int, default=5, help="number of diseased images (rows)")
    ap.add_argument("--gain", type=float, default=4.0, help="heatmap gain: colour = gain x |I - I_hat|")
    ap.add_argument("--colors", type=int, default=128, help="palette size of the PNG (0 = full colour)")
    ap.add_argument("--out", default="anomaly_maps.png")
    args = ap.parse_args(argv)
    models = {}
    for m in args.model:
        label, sep, root = m.partition("=")
        if not sep or not label or not root:
            ap.error(f"--model must be LABEL=BUNDLE_ROOT, got {m!r}")
        models[label] = root
    grid = make_figure(args.config, args.dataset_dir, models, n=args.n, gain=args.gain)
    save_grid(args.out, grid, colors=args.colors)
    print(f"wrote {args.out}: {len(grid)} x {grid.shape[1]} px, {Path(args.out).stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
