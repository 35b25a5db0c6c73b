"""Glue shared by the entry points: errors, atomic file writing, logger and task helpers."""
