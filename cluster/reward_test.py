"""`rayft reward test`: score rows of (prompt, response, reference?) with a reward spec
before spending a run on it. The rows are read as a run reads its prompts, each becomes
the `RewardItem` a run builds from a generation, and they are scored by the same
`Rewards` a run's reward actors hold (in this process), so a reward gives here exactly
what it would give in training; each row's reward is printed with its terms and reasons.

    rayft reward test --reward exact_match --reward length_penalty=0.5 --samples samples.jsonl
    rayft reward test --reward examples/grpo.yaml --samples samples.jsonl --json
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from trainers.errors import DataError, UserError

SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def add_parser(sub) -> None:
    reward = sub.add_parser("reward", help="debug rewards on your own samples",
                            description="Work with reward specs outside a run.")
    rsub = reward.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    p = rsub.add_parser(
        "test", help="score (prompt, response, reference) rows and show why each got its reward",
        description="Score every row of a samples file with a reward spec exactly as an RL run would "
                    "(the same reward code, the items a run builds) and print each row's combined reward, "
                    "every reward's value and the reasons rewards give (code_tests says why a sample got 0). "
                    "Rows: {prompt (text or chat messages), response, reference?, metadata?, response_ids?, "
                    "finish_reason?}. Exit status 2 when a reward raised on any row (a run would stop there).",
        epilog="examples:\n"
               "  rayft reward test --reward exact_match --reward format=0.2 --samples samples.jsonl\n"
               "  rayft reward test --reward examples/grpo.yaml --samples samples.jsonl --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", action="append", required=True, metavar="SPEC",
                   help="a reward FN[=WEIGHT] (a built-in, module:function, file.py:function, model:DIR; "
                        "repeatable), or one YAML/JSON file: a run config (its `rewards` section and model's "
                        "tokenizer are used) or a rewards section ({rewards: [{fn, weight, params, name}]})")
    p.add_argument("--samples", required=True, metavar="FILE", help="rows to score (.jsonl, .json, .csv, .parquet)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="model directory whose tokenizer counts response tokens (for overlong_penalty and "
                        "length_penalty unit tokens; default: a run config's model.path)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per row: line, reward, reason, terms, reasons (and error)")
    p.set_defaults(func=cmd_reward_test)


def cmd_reward_test(args) -> int:
    from rollout.rewards import Rewards

    spec, tokenizer_dir = load_spec(args.reward)
    rewards = Rewards(spec)  # loaded first: a bad param is reported before any row is read
    tokenizer = None
    if args.tokenizer or tokenizer_dir:
        from rollout.inputs import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir)
    samples = read_samples(args.samples, tokenizer)
    rows = score_rows(rewards, samples)
    for row in rows:
        print(json.dumps(row) if args.json else format_row(row))
    failed = sum("error" in row for row in rows)
    if not args.json:
        scored = [row["reward"] for row in rows if "error" not in row]
        mean = f", mean reward {sum(scored) / len(scored):.4g}" if scored else ""
        print(f"{len(rows)} rows{mean}" + (f"; a reward raised on {failed} (a run would stop at the first)"
                                           if failed else ""))
    return 2 if failed else 0


def load_spec(values: list[str]):
    """The RewardSpec the --reward values name, and the tokenizer directory a run config names."""
    files = [v for v in values if v.lower().endswith(SPEC_SUFFIXES)]
    if not files:
        return reward_spec(values), None
    if len(values) > 1:
        raise UserError("--reward: give one spec file, or FN[=WEIGHT] values, not both")
    from cluster.config_core import from_dict, read_config_file
    from rollout.rewards import RewardSpec

    path = files[0]
    data = read_config_file(path)
    if "method" in data or "model" in data:  # a run config: the run's own loading and checks
        from cluster.config import load_config

        config = load_config(path)
        if not config.rewards.rewards:
            raise UserError(f"{path}: the config has no rewards section")
        return config.rewards, config.model.path or None
    section = data["rewards"] if isinstance(data.get("rewards"), dict) else data
    spec = from_dict(RewardSpec, section, "rewards").with_absolute_paths()
    spec.validate()
    return spec, None


def reward_spec(specs: list[str]):
    """`--reward FN[=WEIGHT]` flags -> a RewardSpec (FN: a built-in, module:function,
    file.py:function or model:DIR)."""
    from rollout.rewards import RewardSpec, RewardTerm

    terms = []
    for spec in specs:
        fn, sep, weight = spec.rpartition("=")
        if not sep:
            fn, weight = spec, ""
        try:
            terms.append(RewardTerm(fn=fn, weight=float(weight) if weight else 1.0))
        except ValueError:
            raise UserError(f"--reward {spec}: the weight after '=' must be a number") from None
    spec = RewardSpec(rewards=terms).with_absolute_paths()
    spec.validate("--reward")
    return spec


def read_samples(path: str, tokenizer=None) -> list[tuple[int, object]]:
    """(line, RewardItem) per row: the prompt and reference read as a run's prompt rows
    are, the response and optional generation fields checked with their line and field."""
    from rollout.rewards import RewardItem
    from trainers.data.formats import parse_row
    from trainers.data.readers import read_rows

    samples = []
    for line, row in read_rows(path):
        record = parse_row("prompt", row, path, line, purpose="prompt")
        response = row.get("response")
        if not isinstance(response, str):
            raise DataError(path, line, "is missing" if response is None else "must be a string", "response")
        metadata = row.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise DataError(path, line, "must be an object", "metadata")
        ids = row.get("response_ids")
        if ids is None and tokenizer is not None:
            ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if ids is not None:
            if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
                raise DataError(path, line, "must be a list of token ids", "response_ids")
            metadata = {"response_ids": ids, **metadata}
        metadata = {"finish_reason": row.get("finish_reason") or "stop", **metadata}
        samples.append((line, RewardItem(record.prompt_messages, response, record.reference, metadata)))
    if not samples:
        raise UserError(f"{path}: no rows")
    return samples


def score_rows(rewards, samples: list) -> list[dict]:
    """One result object per row. The batch is scored at once, as a run scores it; when a
    reward raises, row by row, so every failing row is named and the rest still scored."""
    from rollout.rewards import RewardError

    items = [item for _, item in samples]
    try:
        results: list[Optional[object]] = rewards.score(items)
        errors: list[Optional[str]] = [None] * len(items)
    except RewardError:
        results, errors = [], []
        for item in items:
            try:
                results.append(rewards.score([item])[0])
                errors.append(None)
            except RewardError as exc:
                results.append(None)
                errors.append(str(exc).replace("sample 0 ", "this row ", 1))
    rows = []
    for (line, _), result, error in zip(samples, results, errors):
        if error is not None:
            rows.append({"line": line, "reward": None, "reason": f"error: {error}", "error": error})
        else:
            rows.append({"line": line, "reward": result.reward, "reason": result.explain(), "terms": result.terms,
                         "reasons": result.reasons})
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"line {row['line']}: error: {row['error']}"
    lines = [f"line {row['line']}: reward {row['reward']:.4g}"]
    for name, value in row["terms"].items():
        why = row["reasons"].get(name)
        lines.append(f"  {name} {value:.4g}" + (f"  ({why})" if why else ""))
    return "\n".join(lines)

