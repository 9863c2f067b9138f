"""Experiment configurations (ml_collections); `default.py` defines every field."""
