"""Training: optimizer and schedule, checkpoints, metrics, the loop."""
