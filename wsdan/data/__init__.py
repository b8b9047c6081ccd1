"""Data sets and formats."""
