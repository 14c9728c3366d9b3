"""The digital twin: simulate a cryo-ET tilt-series acquisition of an atomic model, with ground truth.

Entry points: :func:`simulate` (Python), ``tomopipe simulate`` (:mod:`.command`), settings in
:class:`SimulationConfig` with the presets ``tiny``, ``small`` and ``tutorial``.
"""

from tomopipe.simulate.config import PRESETS, SimulationConfig, SimulationConfigError, config_from_preset, load_toml
from tomopipe.simulate.run import simulate

__all__ = ["PRESETS", "SimulationConfig", "SimulationConfigError", "config_from_preset", "load_toml", "simulate"]
