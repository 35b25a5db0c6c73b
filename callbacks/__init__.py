"""Callbacks: artifact export (and, with the evaluation work, sample grids and metrics)."""
