"""Side-by-side benchmarks: each workload runs rayft and the reference (what users would
use instead) on the same model, data and machine in one invocation, and reports ratios.

    python -m benchmarks rollout          # vLLM pool vs transformers generate, weight sync
    python -m benchmarks grpo             # GRPO steps/min vs TRL's GRPOTrainer
    python -m benchmarks serve            # rayft serve vs vllm serve under concurrent clients
    python -m benchmarks all

Results go to benchmarks/results/<workload>.json and the table in docs/performance.md.
"""
