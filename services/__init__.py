"""Ray Serve applications: OpenAI-compatible serving of trained checkpoints."""
