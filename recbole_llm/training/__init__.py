"""Training: the plugin trainer, sequence augmentation, training windows and dataset, metrics, DDP on CPU."""
