"""Config structure: one network for training and inference under every override, no list indices,
no parse-time side effects, rank-gated handler lists, tracked parameters from ``hparams``."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.helpers import CONFIGS, REPO

TRAIN, INFER, EVAL = CONFIGS / "train.json", CONFIGS / "inference.json", CONFIGS / "evaluate.json"
MULTI_GPU = CONFIGS / "multi_gpu_train.json"
OVERRIDES = sorted((CONFIGS / "overrides").glob("*.json")) + sorted((CONFIGS / "methods").glob("*.json"))
TINY = REPO / "tests" / "configs" / "tiny.json"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.json")) + [TINY]


def parser_for(files, **override):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([str(f) for f in files])
    p.update(override)
    return p


def network_signature(net: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("override", [None] + OVERRIDES + [TINY], ids=lambda p: "none" if p is None else p.name)
def test_inference_resolves_the_training_network(override):
    """``inference.json`` + the override files used for training builds the same network (weights load strictly).

    A model family of its own (AnatPaste's classifier, SAGAN) has its inference override in
    ``configs/methods/inference/``."""
    extra = [] if override is None else [override]
    family = None if override is None else CONFIGS / "methods" / "inference" / override.name
    infer_extra = [family] if family is not None and family.is_file() else extra
    train_net = parser_for([TRAIN] + extra).get_parsed_content("network_def")
    infer_net = parser_for([INFER] + infer_extra).get_parsed_content("network_def")
    assert type(train_net) is type(infer_net)
    assert network_signature(train_net) == network_signature(infer_net)
    infer_net.load_state_dict(train_net.state_dict())  # strict
    p_train, p_infer = parser_for([TRAIN] + extra), parser_for([INFER] + infer_extra)
    for key in ("image_size", "mask_floor", "mask_rel", "score_kind"):  # preprocessing and mask rule agree too
        assert p_train.get_parsed_content(f"hparams#{key}") == p_infer.get_parsed_content(f"hparams#{key}"), key
    n_intensity = [len(p.get_parsed_content("intensity_transforms")) for p in (p_train, p_infer)]
    assert n_intensity[0] == n_intensity[1]


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_list_index_in_config_references(path):
    """References and override keys name things; ``#3#`` / ``::3`` positions break when a list changes."""
    text = path.read_text()
    assert not re.search(r"(#|::)\d+(#|::|\"|$)", text), f"{path.name} addresses a list element by position"


def test_parsing_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = parser_for([TRAIN, EVAL], bundle_root=str(tmp_path / "bundle"))
    for key in ("dataset_dir", "output_dir", "ckpt_dir", "tracking_uri", "run_name", "eval_dir", "hparams"):
        p.get_parsed_content(key)
    assert p.get_parsed_content("dataset_dir") == "demo_data"  # a plain path, nothing generated
    assert list(tmp_path.iterdir()) == [], "parsing created files"


@pytest.mark.parametrize("section", ["train", "validate"])
def test_every_main_rank_handler_is_gated(section):
    """Each handler of ``<section>#handlers_main_rank`` carries the rank gate, so multi_gpu_train.json only
    sets ``is_main_rank``; adding a handler to the list without the gate fails here."""
    config = json.loads(TRAIN.read_text())[section]
    for h in config["handlers_main_rank"]:
        assert h.get("_disabled_") == "$not @is_main_rank", h["_target_"]
    for h in config["handlers_all_ranks"]:
        assert "_disabled_" not in (h if isinstance(h, dict) else {}), h


@pytest.mark.parametrize("main", [True, False])
def test_rank_gate_drops_the_main_rank_handlers(tmp_path, main):
    p = parser_for([TRAIN, TINY], bundle_root=str(tmp_path), is_main_rank=main)
    p["data_split"] = [[], []]  # handlers need loaders, not images
    for section, n in (("train", 3), ("validate", 4)):
        handlers = p.get_parsed_content(f"{section}#handlers_main_rank", instantiate=True)
        assert len(handlers) == (n if main else 0), section
    if not main:  # other ranks never open the MLflow store
        assert not (tmp_path / "output").exists()


def test_multi_gpu_overrides_only_named_ids():
    multi = json.loads(MULTI_GPU.read_text())
    assert multi["is_main_rank"] == "$dist.get_rank() == 0"
    assert not any("handlers" in k for k in multi), "rank gating belongs to is_main_rank, not to handler lists"


def test_tracked_params_cover_every_hparam(tmp_path):
    from scripts.tracking import flatten

    p = parser_for([TRAIN], bundle_root=str(tmp_path))
    expected = set(flatten(p.get_parsed_content("hparams")))
    p["data_split"] = [[], []]  # no dataset needed to build the params
    params = p.get_parsed_content("tracked_params")
    assert expected <= set(params), sorted(expected - set(params))
    assert {"dataset_dir", "n_train_images", "command", "loss_weights.dice"} <= set(params)
