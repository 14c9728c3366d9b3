"""Pipeline steps, one module per seed step. Importing this package registers them all."""

from tomopipe.steps import import_movies  # noqa: F401
from tomopipe.steps import motion_ctf  # noqa: F401
from tomopipe.steps import exclude  # noqa: F401
from tomopipe.steps import xray_eraser  # noqa: F401
from tomopipe.steps import preprocess  # noqa: F401
from tomopipe.steps import reconstruct  # noqa: F401
from tomopipe.steps import assign_alignment  # noqa: F401
from tomopipe.steps import align  # noqa: F401
from tomopipe.steps import import_alignment  # noqa: F401
