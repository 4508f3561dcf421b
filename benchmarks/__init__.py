"""Side-by-side benchmarks: each workload runs rayft and the reference (what users would
use instead) on the same model, data and machine in one invocation, and reports ratios.

    make bench                            # sets up .venv-bench (TRL), runs every workload
    python -m benchmarks sft              # SFT LoRA/full tokens/s, MFU, loss vs TRL SFTTrainer, transformers Trainer
    python -m benchmarks dpo              # DPO LoRA/full pairs/s vs TRL's DPOTrainer
    python -m benchmarks rollout          # vLLM pool vs transformers generate, weight sync
    python -m benchmarks grpo             # GRPO steps/min vs TRL's GRPOTrainer
    python -m benchmarks serve            # rayft serve vs vllm serve under concurrent clients
    python -m benchmarks data             # data prep rows/s and driver memory: streaming, in memory, datasets map
    python -m benchmarks all

Run them with .venv-bench/bin/python (TRL lives there, not in rayft's dependencies).
Results go to benchmarks/results/<workload>.json and the table in docs/performance.md.
"""
