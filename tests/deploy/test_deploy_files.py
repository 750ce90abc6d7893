"""The Deploy app's package files agree with the project: pins, version, entry point."""

import configparser
import json

import yaml

from tests.helpers import REPO

APP = REPO / "bundle" / "app"


def _pins(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_requirements_pin_what_setup_cfg_pins():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    expected = _pins(cfg["options"]["install_requires"]) + _pins(cfg["options.extras_require"]["deploy"])
    assert _pins((APP / "requirements.txt").read_text()) == expected
    assert all("==" in p for p in expected), "every package pinned"


def test_app_yaml_version_is_the_bundle_version():
    manifest = yaml.safe_load((APP / "app.yaml").read_text())
    meta = json.loads((REPO / "configs" / "metadata.json").read_text())
    assert str(manifest["application"]["version"]) == meta["version"]
    assert manifest["application"]["inputFormats"] == ["file"]


def test_entry_point_is_a_python_app_folder():
    """``holoscan package`` and ``python bundle/app`` need ``__main__.py`` in the app folder."""
    assert (APP / "__main__.py").is_file() and (APP / "app.py").is_file()
