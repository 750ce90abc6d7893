"""Fixtures shared by the bundle tests."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def no_tracking_env():
    """MONAI's MLFlowHandler prefers MLFLOW_TRACKING_URI over the config's tracking_uri: keep it out."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield
