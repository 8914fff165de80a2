"""Model construction (architectures) and self-describing checkpoints."""
