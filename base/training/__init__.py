"""Training machinery: optimizers and schedules, adapters, sharding, checkpoints, resumable order, export."""
