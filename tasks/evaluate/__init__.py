"""The evaluate stage: test metrics, plots and the quality gates."""
