"""DICOM VOI LUT Sequence and MONOCHROME1 in the reader (custom_transforms.io.read_dicom)."""

import numpy as np
import pytest
from pydicom.uid import generate_uid

from custom_transforms.io import read_cxr
from scripts.deploy.sample_dicom import VOI_GAMMA, write_cxr_dicom

RAMP = np.tile(np.linspace(0.0, 1.0, 64), (64, 1))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_plain_file_reads_back(tmp_path, photometric):
    write_cxr_dicom(tmp_path / "a.dcm", RAMP, study_uid=generate_uid(), photometric=photometric)
    np.testing.assert_allclose(read_cxr(tmp_path / "a.dcm"), RAMP, atol=1e-3)


def test_voi_lut_sequence_is_applied(tmp_path):
    """The Modality LUT output is float; the VOI LUT must still index it (float indices gave max error 0.9)."""
    write_cxr_dicom(tmp_path / "a.dcm", RAMP, study_uid=generate_uid(), voi_lut=True)
    np.testing.assert_allclose(read_cxr(tmp_path / "a.dcm"), RAMP ** VOI_GAMMA, atol=1e-3)


def test_voi_lut_then_monochrome1_inversion(tmp_path):
    """The LUT maps stored values; MONOCHROME1 is inverted after it (PS3.3 C.7.6.3.1.2)."""
    write_cxr_dicom(tmp_path / "a.dcm", RAMP, study_uid=generate_uid(), voi_lut=True, photometric="MONOCHROME1")
    np.testing.assert_allclose(read_cxr(tmp_path / "a.dcm"), 1.0 - (1.0 - RAMP) ** VOI_GAMMA, atol=1e-3)
