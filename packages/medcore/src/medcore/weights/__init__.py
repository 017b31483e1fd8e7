"""Model weights: checkpoints, pretrained resolution, state-dict key conversion, input normalisation."""
