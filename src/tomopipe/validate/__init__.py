"""Validation against the simulator's truth: scores of a project's results against a simulated
acquisition's ground truth (:mod:`.truth`, :mod:`.scores`, :mod:`.score_alignment`, :mod:`.tomogram`),
and the registry of scorers by set kind (:mod:`.registry`)."""
