"""The `rayft` command line. Each subcommand parses its arguments here and calls the
module that owns the work. Exit status: 0 success, 2 user error (one line on stderr),
1 anything else."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from trainers.errors import UserError, WorkerError
from trainers.families import FAMILIES

DESCRIPTION = "rayft: fine-tune and align language models on Ray."
EPILOG = textwrap.dedent("""\
    examples:
      rayft init-model --preset tiny --out models/tiny
      rayft data synth --task addition --n 2000 --out data/addition.jsonl
      rayft data check data/addition.jsonl --tokenizer models/tiny --show 2
      rayft train examples/sft_lora.yaml train.max_steps=50
      rayft eval runs/sft-lora --data data/addition.jsonl
      rayft export runs/sft-lora --out models/merged --merge-lora
      rayft serve runs/sft-lora --port 8000
    """)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayft", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init-model", help="build a small random model of a family and its BPE tokenizer locally",
                       description="Build a random-initialised model of one family with a byte-level BPE "
                                   "tokenizer and the family's chat template, written by transformers' "
                                   "save_pretrained (safetensors). See docs/models.md.")
    p.add_argument("--arch", choices=list(FAMILIES), default="llama",
                   help="model family: llama (ChatML), llama3, qwen2, qwen3, mistral, gemma2, phi3, "
                        "qwen3_moe (routed experts)")
    p.add_argument("--preset", choices=["tiny", "small", "bench"], default="tiny",
                   help="tiny: tests (head_dim 64, vLLM-CPU compatible); small: examples; bench: ~30M params")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--corpus", nargs="*", default=[], metavar="FILE",
                   help="extra text files (one sample per line) to train the tokenizer on")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    p.add_argument("--pretrain-steps", type=int, default=0, metavar="N",
                   help="briefly pre-train on the corpus (N steps) so the model is a weak LM that "
                        "LoRA and other adapters can fine-tune like a real base model")
    p.set_defaults(func=cmd_init_model)

    data = sub.add_parser("data", help="inspect and generate training data",
                          description="Inspect data files and generate synthetic tasks.")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("check", help="validate a data file and print its statistics",
                        description="Detect the format, validate every row and report token lengths. "
                                    "Formats: alpaca, domain, cot, sharegpt, chat, completion, text, "
                                    "classification, preference, scored, prompt.")
    p.add_argument("file", help=".jsonl, .json, .csv, .parquet or a saved datasets directory")
    p.add_argument("--format", default="auto", help="row format (default: detect)")
    p.add_argument("--purpose", default="auto",
                   choices=["auto", "sft", "preference", "scored", "classification", "prompt"],
                   help="what the data is for (decides which record type is expected); auto: what the "
                        "detected format is for (a prompt row -> prompt; give --purpose prompt to read a "
                        "conversation file as RL prompts)")
    p.add_argument("--tokenizer", help="model directory whose tokenizer measures lengths")
    p.add_argument("--max-length", type=int, default=512, help="length above which a row counts as truncated")
    p.add_argument("--truncation-side", choices=["right", "left"], default="right")
    p.add_argument("--show", type=int, default=0, metavar="N", help="render N samples with «trained spans» marked")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows and count them")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_data_check)

    p = dsub.add_parser("synth", help="write a synthetic task a tiny model can learn",
                        description="Write a learnable synthetic chat task (with a reference answer per row).")
    p.add_argument("--task", required=True,
                   help="task name: addition, small_addition, small_addition_mixed, reverse, sentiment, "
                        "addition_pref; for environments calculator, calculator_sft, guess_number")
    p.add_argument("--n", type=int, required=True, help="number of rows")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("train", help="run a training job from a YAML config",
                       description="Run a training job. The method (sft, cpt, classification, rm, dpo, ppo, "
                                   "grpo, distill) comes from the config; key.sub=value arguments override "
                                   "config keys. ppo, grpo and on-policy distill also start the rollout "
                                   "engines and reward (or teacher) actors on the cluster.",
                       epilog="example: rayft train examples/sft_lora.yaml train.lr=1e-4 cluster.num_workers=2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a run or model on a data file (loss, exact match, F1, rewards)",
                       description="Evaluate a run's final model (or a model / adapter directory) in this process, "
                                   "on the GPU when there is one. Causal LMs get loss and perplexity on "
                                   "conversations and raw text, and exact match of greedy generations on rows "
                                   "with a 'reference' or 'answer'; classifiers get accuracy and macro-F1 on "
                                   "text/label rows; reward models (one-output classifiers) get pairwise "
                                   "accuracy and margin on preference rows, and a reward per row on "
                                   "(prompt, response) rows (with MSE and MAE when rows carry a score). "
                                   "See docs/eval.md.")
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="run directory (its final/ is used) or model directory")
    p.add_argument("--data", required=True, metavar="FILE", help="data file (any format `rayft data check` reads)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="tokens per row (default: the run's data.max_length, else 512)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="rows (preference pairs) per forward pass")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="generation length for exact match")
    p.add_argument("--out", metavar="FILE", help="write one JSON line of results per row")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a standalone transformers model directory",
                       description="Export a run's final model (or a model / adapter directory). With "
                                   "--merge-lora an adapter (LoRA, DoRA, IA3) is merged into its base and saved "
                                   "as a plain model; without it an adapter is copied as an adapter.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory (its final/ is used) or model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--merge-lora", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="batch-generate through the rollout engine pool",
                       description="Generate responses for every prompt of a file on a pool of engine actors "
                                   "(vLLM where installed, else transformers). A LoRA run is served as its base "
                                   "plus the adapter. With --reward, every sample is scored and the best kept "
                                   "(best-of-n). Writes one JSON line per prompt.",
                       epilog="example: rayft generate runs/sft-lora --prompts data/addition.jsonl "
                              "--out gen.jsonl --n 4 --reward exact_match")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory (its final/ is used) or model directory")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompts: prompt rows, or chat/alpaca rows whose last answer becomes the reference")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL")
    p.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto", help="generation engine")
    p.add_argument("--engines", type=int, default=1, metavar="N", help="engine actors in the pool")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="prompts per pool request")
    p.add_argument("--reward", action="append", metavar="FN[=WEIGHT]",
                   help="score samples and keep the best: exact_match, format, length_penalty, module:function, "
                        "file.py:function or model:DIR; repeat to combine with weights")
    p.set_defaults(func=cmd_generate)

    from cluster import jobs, reward_test, tune
    from cluster.serve import add_serve_parser

    add_serve_parser(sub)
    reward_test.add_parser(sub)   # reward test
    jobs.add_parsers(sub)   # submit, jobs
    tune.add_parsers(sub)
    return parser


def cmd_init_model(args) -> int:
    from trainers.models import build_model

    out = build_model(args.preset, args.out, args.corpus, seed=args.seed, pretrain_steps=args.pretrain_steps,
                      arch=args.arch)
    print(f"model written to {out}")
    return 0


def cmd_data_check(args) -> int:
    from trainers.data import check_file, format_check
    from trainers.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    report = check_file(args.file, tokenizer=tokenizer, fmt=args.format, purpose=args.purpose,
                        max_length=args.max_length, truncation_side=args.truncation_side,
                        skip_bad_rows=args.skip_bad_rows, show=args.show)
    print(json.dumps(report, indent=2) if args.json else format_check(report))
    return 0


def cmd_data_synth(args) -> int:
    from trainers.data import write_synth

    if args.n < 1:
        raise UserError("--n must be >= 1")
    print(f"wrote {args.n} rows to {write_synth(args.task, args.n, args.out, seed=args.seed)}")
    return 0


def cmd_train(args) -> int:
    from cluster.config import JobConfig, config_help, load_config

    if args.help_config:
        print(config_help(JobConfig))
        return 0
    if args.config is None and not args.overrides:
        raise UserError("give a config file (see examples/) or key=value overrides")
    config_file = args.config if args.config and "=" not in args.config else None
    overrides = ([args.config] if args.config and config_file is None else []) + args.overrides
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    config = load_config(config_file, overrides, default_name="run")

    from cluster.train import run_training

    summary = run_training(config)
    run_dir = config.run_dir
    print(f"run directory: {run_dir}\nreport: {run_dir / 'report.html'}\nfinal model: {run_dir / 'final'}")
    for key in ("eval_loss", "eval_reward", "eval_divergence"):
        if summary.get(f"final_{key}") is not None:
            print(f"{key.replace('_', ' ')}: {summary[f'first_{key}']:.4f} -> {summary[f'final_{key}']:.4f}")
    if summary.get("timing_s_per_step"):
        print("seconds per step: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["timing_s_per_step"].items() if v))
    return 0


def cmd_eval(args) -> int:
    from cluster.evaluate import EvalOptions, evaluate, format_report, to_json, write_samples

    opts = EvalOptions(max_length=args.max_length, batch_size=args.batch_size, limit=args.limit,
                       max_new_tokens=args.max_new_tokens)
    report, samples = evaluate(args.target, args.data, opts)
    if args.out:
        report["samples_file"] = str(write_samples(args.out, samples))
    print(to_json(report) if args.json else format_report(report))
    return 0


def cmd_export(args) -> int:
    from cluster.export import export

    print(export(args.checkpoint, args.out, merge_lora=args.merge_lora, force=args.force))
    return 0


def cmd_generate(args) -> int:
    from cluster.generate import run_generate

    if args.n < 1 or args.engines < 1:
        raise UserError("--n and --engines must be >= 1")
    run_generate(args.checkpoint, args.prompts, args.out, engine=args.engine, engines=args.engines, n=args.n,
                 temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                 seed=args.seed, batch_size=args.batch_size, reward=args.reward)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options (`serve MODEL --port 1 a=b`), which argparse
    # leaves unparsed once the positionals were filled.
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    return args


def main(argv: list[str] | None = None) -> int:
    from rollout.reward_rules import RewardError
    from rollout.stack import UnsupportedVersion, check_stack

    args = parse_args(argv)
    unsupported = check_stack()  # package metadata only: the libraries are not imported
    if unsupported:
        print(f"rayft: error: {'; '.join(unsupported)}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (UserError, RewardError, UnsupportedVersion) as exc:
        print(f"rayft: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"rayft: error: {exc}\nrayft: the full traceback of every failed worker: {exc.traceback_file}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rayft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
