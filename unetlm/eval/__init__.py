"""Evaluation and inspection tools."""
