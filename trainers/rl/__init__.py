"""Reinforcement learning and distillation on the rollout pool (`method: ppo | grpo |
distill`): the typed config, the experience a step collects, the per-method objectives
and the loop that runs them inside the Ray Train worker group."""
