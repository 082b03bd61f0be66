"""Thresher: distributed data curation for training data."""

__version__ = "0.1.0"
