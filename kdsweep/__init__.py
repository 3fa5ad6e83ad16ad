"""kdsweep: tune every knowledge-distillation method fairly, track it in MLflow, rank it."""

__version__ = "0.1.0"
