"""mssl-repair: reverse adversarial attacks with multiple self-supervised tasks (Lawhon & Ducrest)."""
from .pipeline import Pipeline, load_pipeline

__all__ = ["Pipeline", "load_pipeline"]
