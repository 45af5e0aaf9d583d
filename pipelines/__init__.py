"""Data loading: one augmentation spec, loader backends, built-in datasets, .beton conversion.

Imports nothing from the core package: loaders take a DataSpec and a LoaderSpec (spec.py), which fastft/data.py
builds from a run's config.
"""
