"""lightning-mtl: multi-task learning for PyTorch Lightning."""
