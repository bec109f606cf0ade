"""Per-language gradients: collectors (each language's gradient slice on this rank), the Gram step (Grams,
method weights, the combined update) and the one adapter to DeepSpeed's private internals."""
from megavac.pergrad.collectors import (GradCollector, KBackwardCollector, LanguageGrads, PipelineCollector,
                                        default_collector)
from megavac.pergrad.gram_step import PerLanguageStep, StepStats

__all__ = ["GradCollector", "KBackwardCollector", "LanguageGrads", "PerLanguageStep", "PipelineCollector",
           "StepStats", "default_collector"]
