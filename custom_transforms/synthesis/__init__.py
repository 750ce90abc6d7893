"""Anomaly synthesis: the method bases, ART-ASyn (Sec. 3.2) and the training-sample composition."""

from custom_transforms.synthesis.artasyn import STEPS, ARTASyn, ARTASynd, ARTASynParams, synthesize_artasyn
from custom_transforms.synthesis.base import AnomalySynthesis, AnomalySynthesisd, SourcePool
from custom_transforms.synthesis.brush import make_brush
from custom_transforms.synthesis.samples import CleanSampled, SeededPerSampled, SyntheticCopiesd

__all__ = ["STEPS", "ARTASyn", "ARTASynd", "ARTASynParams", "AnomalySynthesis", "AnomalySynthesisd", "CleanSampled",
           "SeededPerSampled", "SourcePool", "SyntheticCopiesd", "make_brush", "synthesize_artasyn"]
