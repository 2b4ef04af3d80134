"""visionpoc: fine-tune a candidate vision model and the production baseline on the same data,
with the same loop and budget, and report time, accuracy and whether the difference is real."""

__version__ = "0.1.0"
