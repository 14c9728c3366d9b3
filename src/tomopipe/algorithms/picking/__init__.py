"""Particle picking by template matching: template construction and per-tilt template weighting."""
