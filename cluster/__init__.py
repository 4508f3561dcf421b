"""The front door: the `rayft` CLI, config loading, the embedded local Ray cluster,
job submission and tuning."""
