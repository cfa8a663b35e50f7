"""Evaluation: ranking metrics and the evaluation loops."""
