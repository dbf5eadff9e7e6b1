"""mssl-repair: reverse adversarial attacks with multiple self-supervised tasks (Lawhon & Ducrest)."""
from .defended import DefendedClassifier, Purifier
from .pipeline import Pipeline, load_pipeline

__all__ = ["DefendedClassifier", "Pipeline", "Purifier", "load_pipeline"]
