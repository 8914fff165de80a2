"""Data stages: fetch the raw source, prepare validated tensors, augment batches."""
