"""Everything that updates weights: data pipeline, model and PEFT setup, distributed
strategy, losses, one Ray Train loop per method, checkpoints."""
