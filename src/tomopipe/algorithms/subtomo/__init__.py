"""Subtomogram averaging algorithms."""
