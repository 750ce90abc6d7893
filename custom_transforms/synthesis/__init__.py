"""Anomaly synthesis: the method bases, ART-ASyn (Sec. 3.2), the methods it is compared with (CutPaste, NSA,
AnatPaste, FPI; ART-ASyn Table 2) and the training-sample composition.

``METHODS`` maps the method names of the configs and MLflow (``configs/methods/<name>.json``) to their dictionary
transforms; ``none`` (no synthesis) has no transform.
"""

from custom_transforms.synthesis.anatpaste import AnatPaste, AnatPasted, AnatPasteParams, synthesize_anatpaste
from custom_transforms.synthesis.artasyn import STEPS, ARTASyn, ARTASynd, ARTASynParams, synthesize_artasyn
from custom_transforms.synthesis.base import AnomalySynthesis, AnomalySynthesisd, SourcePool
from custom_transforms.synthesis.brush import make_brush
from custom_transforms.synthesis.cutpaste import CutPaste, CutPasted, CutPasteParams, synthesize_cutpaste
from custom_transforms.synthesis.fpi import FPI, FPId, FPIParams, synthesize_fpi
from custom_transforms.synthesis.nsa import NSA, NSAd, NSAParams, synthesize_nsa
from custom_transforms.synthesis.samples import CleanSampled, RandPoolImaged, SeededPerSampled, SyntheticCopiesd

METHODS = {"artasyn": ARTASynd, "cutpaste": CutPasted, "nsa": NSAd, "anatpaste": AnatPasted, "fpi": FPId}

__all__ = ["METHODS", "STEPS", "ARTASyn", "ARTASynd", "ARTASynParams", "AnatPaste", "AnatPasted", "AnatPasteParams",
           "AnomalySynthesis", "AnomalySynthesisd", "CleanSampled", "CutPaste", "CutPasted", "CutPasteParams", "FPI",
           "FPId", "FPIParams", "NSA", "NSAd", "NSAParams", "RandPoolImaged", "SeededPerSampled", "SourcePool",
           "SyntheticCopiesd",
           "make_brush", "synthesize_anatpaste", "synthesize_artasyn", "synthesize_cutpaste", "synthesize_fpi",
           "synthesize_nsa"]
