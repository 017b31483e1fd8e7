"""The training engine: the Trainer, its loop state, loading, evaluation, checkpoints, optimisation, inference."""
