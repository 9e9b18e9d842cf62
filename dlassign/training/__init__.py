"""Training: pure steps, the one step runner, the resumable trainer, grid search, evaluation."""
