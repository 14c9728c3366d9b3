"""Pipeline steps, one module per seed step. Importing this package registers them all."""

from tomopipe.steps import (
    align,  # noqa: F401
    assign_alignment,  # noqa: F401
    auto_refine,  # noqa: F401
    exclude,  # noqa: F401
    extract_subtomos,  # noqa: F401
    import_alignment,  # noqa: F401
    import_movies,  # noqa: F401
    initial_model,  # noqa: F401
    motion_ctf,  # noqa: F401
    pick_network,  # noqa: F401
    pick_template,  # noqa: F401
    picks,  # noqa: F401
    postprocess,  # noqa: F401
    preprocess,  # noqa: F401
    reconstruct,  # noqa: F401
    reconstruct_particle,  # noqa: F401
    xray_eraser,  # noqa: F401
)
