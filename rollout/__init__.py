"""Everything that produces or scores samples: generation engines, the engine actor
pool, weight-sync receivers and reward actors."""
