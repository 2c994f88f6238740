"""Training: the per-step GHA update, the Trainer callback, calibration and routing metrics."""
