"""Data loading: one augmentation spec, loader backends, built-in datasets. Never imports the model or the loop."""
