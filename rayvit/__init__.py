"""Shared library of the project: config, data, preprocessing, model, checkpoints."""

__version__ = "0.1.0"
