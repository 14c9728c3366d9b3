"""tomopipe: cryo-electron tomography from tilt-series movies to subtomogram averages."""

__version__ = "0.1.0"
