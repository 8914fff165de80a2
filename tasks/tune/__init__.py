"""The tune stage: an Optuna study over the training knobs."""
