"""The methods that paste from a second training image, NSA and FPI: what their transforms share through
``SourceSynthesis`` / ``SourceSynthesisd`` (custom_transforms.synthesis.base), each check run for both methods.
What is particular to a method is in test_nsa.py and test_fpi.py.

Procedural inputs only: the phantom with a striped source (all object pixels, as NSA's patches need).
"""

from typing import NamedTuple

import cv2
import numpy as np
import pytest

from custom_transforms.synthesis.fpi import FPI, FPId, FPIParams, synthesize_fpi
from custom_transforms.synthesis.nsa import NSA, NSAd, NSAParams, synthesize_nsa
from tests.custom_transforms import synthesis_helpers as checks

IMG, LUNG = checks.phantom(64)
SRC = checks.stripes(64)
sample = checks.sampler(IMG, LUNG, src=SRC)

class Method(NamedTuple):
    dict_cls: type
    array_cls: type
    params_cls: type
    field: dict  # a parameter to set, and its value
    synthesize: object  # the pure function
    too_small: int  # px: an image side the pure function refuses


METHODS = {
    "FPI": Method(FPId, FPI, FPIParams, {"alpha_range": (0.3, 0.3)}, synthesize_fpi, 4),
    "NSA": Method(NSAd, NSA, NSAParams, {"n_patches": 1}, synthesize_nsa, 8),
}
EACH_METHOD = pytest.mark.parametrize("method", sorted(METHODS))


# ---------------------------------------------------------------------------------------------------
# the pure functions


@EACH_METHOD
def test_seeds_reproduce_and_differ(method):
    img, lung = checks.phantom(256)  # NSA's patches can change nothing at 64 px
    checks.assert_seeds_reproduce_and_differ(METHODS[method].synthesize, img, lung, compare=1,
                                             source=checks.stripes(256))


@EACH_METHOD
def test_bad_inputs_give_clear_errors(method):
    checks.assert_source_input_errors(METHODS[method].synthesize, IMG, LUNG, SRC, small=METHODS[method].too_small)


# ---------------------------------------------------------------------------------------------------
# MONAI transforms


@EACH_METHOD
def test_missing_pool_and_source_is_a_clear_error(method):
    checks.assert_source_errors(METHODS[method].dict_cls, sample)


@EACH_METHOD
def test_explicit_source_wins_over_the_pool(method, tmp_path):
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"train_{i}.png"))
        cv2.imwrite(paths[-1], np.round(255 * checks.stripes(64, period=6 + 2 * i)).astype(np.uint8))
    checks.assert_explicit_source_wins(METHODS[method].dict_cls, checks.make_pool(paths), sample)


@EACH_METHOD
def test_options_keys_and_common_errors(method):
    dict_cls, array_cls, params_cls, field = METHODS[method][:4]
    checks.assert_common_errors(dict_cls, array_cls)
    checks.assert_key_handling(lambda **kw: dict_cls(source_key="src", **kw), sample, IMG, LUNG, src=SRC[None])
    t = dict_cls(params=params_cls(**field), label="binary")  # params, and single fields by keyword
    assert t.synthesizer.params == params_cls(**field, label="binary")
    assert t.synthesizer.needs_source and not t.synthesizer.needs_lung
    assert dict_cls(restrict_to_lung=True).synthesizer.needs_lung


@EACH_METHOD
def test_prob_zero_and_with_restrict_to_lung_an_empty_lung_map_give_clean_samples(method):
    restricted = lambda **kw: METHODS[method].dict_cls(source_key="src", restrict_to_lung=True, **kw)
    checks.assert_prob_zero_and_empty_lung_clean(restricted, sample)
