"""Reports: scores of a project's results against a simulated acquisition's ground truth."""
