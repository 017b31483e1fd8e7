"""Model weights: checkpoints, pretrained resolution, state-dict key conversion, input
normalisation, exported models and the sources a trained model is read from."""
