"""Fixtures shared by the bundle tests."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def no_tracking_env():
    """MONAI's MLFlowHandler prefers MLFLOW_TRACKING_URI over the config's tracking_uri: keep it out."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


DEMO = dict(n_train=8, n_test_healthy=3, n_test_diseased=3, size=64, seed=0)  # the tiny bundles' phantoms


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """Demo phantoms for a tiny bundle (module scope: one set per test module)."""
    from scripts.data.phantoms import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    assert generate_demo_dataset(root, **DEMO)["generated"]
    return root
