"""Training: loss, optimizer, the jitted step, checkpoints, metrics and the run report."""
