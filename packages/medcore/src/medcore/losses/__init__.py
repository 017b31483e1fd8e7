"""Loss building blocks more than one package needs."""
