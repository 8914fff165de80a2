"""The train stage: one training loop, its optimizers, DDP under torchrun, packed trials."""
