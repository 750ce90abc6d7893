"""Lung segmentation: PBTSeg (ART-ASyn Sec. 3.1) and AnatPaste's Otsu segmentation, as MONAI transforms.

The pure functions are ``custom_transforms.lung.pbtseg.pbtseg`` and ``custom_transforms.lung.otsu.otsu_lung_seg``
(also exported by the top-level package).
"""

from custom_transforms.lung.base import LEFT, RIGHT, LungNotFoundError, LungNotFoundWarning, LungSeg, LungSegd
from custom_transforms.lung.otsu import OtsuLungSeg, OtsuLungSegd
from custom_transforms.lung.pbtseg import PBTSeg, PBTSegd

__all__ = ["LEFT", "RIGHT", "LungNotFoundError", "LungNotFoundWarning", "LungSeg", "LungSegd", "OtsuLungSeg",
           "OtsuLungSegd", "PBTSeg", "PBTSegd"]
