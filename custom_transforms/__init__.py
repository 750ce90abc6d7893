"""MONAI transforms of the ART-ASyn bundle: loading, lung segmentation, anomaly synthesis, anomaly maps.

Public API (``from custom_transforms import PBTSegd, ARTASynd, LoadCXRd``); the layout and the dictionary
keys are described in docs/architecture.md.
"""

from custom_transforms.anomaly import (
    SCORE_KINDS,
    AnomalyPostd,
    anomaly_map,
    calibrate_threshold,
    image_score,
    paper_mask,
    threshold_mask,
)
from custom_transforms.io import CXRReadError, LoadCXRd, load_cxr, load_mask, read_cxr
from custom_transforms.lung import (
    LungNotFoundError,
    LungNotFoundWarning,
    LungSeg,
    LungSegd,
    OtsuLungSeg,
    OtsuLungSegd,
    PBTSeg,
    PBTSegd,
)
from custom_transforms.lung.otsu import otsu_lung_seg
from custom_transforms.lung.pbtseg import pbtseg
from custom_transforms.plausibility import Plausibilityd, plausibility_reasons
from custom_transforms.synthesis import (
    METHODS,
    STEPS,
    AnatPasted,
    AnomalySynthesis,
    AnomalySynthesisd,
    ARTASyn,
    ARTASynd,
    ARTASynParams,
    CleanSampled,
    CutPasted,
    FPId,
    NSAd,
    RandPoolImaged,
    SeededPerSampled,
    SourcePool,
    SyntheticCopiesd,
    make_brush,
    synthesize_artasyn,
)

__all__ = [
    # loading
    "CXRReadError", "LoadCXRd", "load_cxr", "load_mask", "read_cxr",
    # lung segmentation
    "LungNotFoundError", "LungNotFoundWarning", "LungSeg", "LungSegd", "OtsuLungSeg", "OtsuLungSegd", "PBTSeg",
    "PBTSegd", "otsu_lung_seg", "pbtseg",
    # synthesis
    "METHODS", "STEPS", "AnomalySynthesis", "AnomalySynthesisd", "ARTASyn", "ARTASynd", "ARTASynParams", "CutPasted",
    "NSAd", "AnatPasted", "FPId", "CleanSampled",
    "RandPoolImaged", "SeededPerSampled", "SourcePool", "SyntheticCopiesd", "make_brush", "synthesize_artasyn",
    # anomaly maps, scores, masks
    "SCORE_KINDS", "AnomalyPostd", "anomaly_map", "calibrate_threshold", "image_score", "paper_mask",
    "threshold_mask",
    # plausibility gate (inference)
    "Plausibilityd", "plausibility_reasons",
]
