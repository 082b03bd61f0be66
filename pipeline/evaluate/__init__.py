"""Evaluation harnesses (instance selection: see instance_selection.py)."""
