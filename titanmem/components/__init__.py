"""Training components: optimizer, lr schedule, checkpointing and metrics."""
