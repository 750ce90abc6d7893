"""The public API of custom_transforms and the direction of the layers."""

import ast
import subprocess
import sys

import pytest

import custom_transforms
from tests.helpers import REPO


def test_public_api_imports():
    from custom_transforms import METHODS, ARTASynd, LoadCXRd, OtsuLungSegd, PBTSegd, SyntheticCopiesd  # noqa: F401
    from scripts.comparison import own_loss

    synthesis_files = [p.stem for p in (REPO / "configs" / "methods").glob("*.json")
                       if p.stem != "none" and own_loss(p.stem) is None]  # not the model families
    assert sorted(METHODS) == sorted(synthesis_files)
    for name in custom_transforms.__all__:
        assert getattr(custom_transforms, name) is not None, name
    assert len(set(custom_transforms.__all__)) == len(custom_transforms.__all__)


@pytest.mark.parametrize("module", ["custom_transforms.lung.pbtseg", "custom_transforms.lung.otsu",
                                    "custom_transforms.synthesis.artasyn", "custom_transforms.synthesis.samples",
                                    "custom_transforms.synthesis.cutpaste", "custom_transforms.synthesis.nsa",
                                    "custom_transforms.synthesis.anatpaste", "custom_transforms.synthesis.fpi"])
def test_submodule_paths_resolve_for_configs(module):
    """``_target_`` paths by module stay locatable (no package attribute shadows a submodule)."""
    import pydoc

    mod = pydoc.locate(module)
    assert mod is not None and mod.__name__ == module


def test_custom_transforms_imports_nothing_from_scripts():
    code = ("import sys, custom_transforms\n"
            "bad = sorted(m for m in sys.modules if m == 'scripts' or m.startswith('scripts.'))\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in (REPO / "custom_transforms").rglob("*.py"):  # not even lazily, inside functions
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "scripts" or n.startswith("scripts.") for n in names), f"{path} imports {names}"
