"""Rule-based rewards: the built-in rule functions and resolving a `"module:function"`
reference to a Python function.

Every rule function has the signature

    fn(prompt: str, response: str, reference: str | None, metadata: dict, **params) -> float

or returns `(value, reason)`, the reason a string saying why the sample got its value
(shown by `rayft reward test` and kept in `RewardResult.reasons`). A function with an
integer attribute `workers` is called for that many samples at once, from threads (for
rules that wait on a subprocess or a server).

`prompt` is the text of the last user turn, `metadata["messages"]` the full prompt
messages, and `params` the reward's `params` from the config, as keyword arguments.
References: a built-in by short name (`exact_match`) or as `rayft:exact_match`, an
importable module (`my_pkg.rewards:score`) or a file (`path/to/rewards.py:score`).
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Callable, Optional

from rollout import code_reward, judge_reward
from rollout.refs import RefError, import_object

RuleFn = Callable[..., float]


class RewardError(Exception):
    """A reward could not be set up or computed: a bad reference, a rule function that
    raised or returned a non-number, a reward model that failed. `reward` names the
    reward (its reference), `index` the sample in the scored batch, when known."""

    def __init__(self, message: str, reward: Optional[str] = None, index: Optional[int] = None):
        super().__init__(message)
        self.reward, self.index = reward, index

    def __reduce__(self):
        # Pickled across Ray workers: rebuild from all three fields, not just `args`.
        return type(self), (self.args[0], self.reward, self.index)


def exact_match(prompt: str, response: str, reference: Optional[str], metadata: dict) -> float:
    """1.0 when the response equals the reference, ignoring surrounding whitespace; else 0.0."""
    if reference is None:
        raise ValueError("exact_match needs a reference answer (the row's `reference`)")
    return 1.0 if response.strip() == str(reference).strip() else 0.0


def format_check(prompt: str, response: str, reference: Optional[str], metadata: dict,
                 pattern: Optional[str] = None) -> float:
    """1.0 when the stripped response matches `pattern` in full (re.fullmatch, DOTALL);
    without a pattern, when it is a single non-empty line. Else 0.0."""
    text = response.strip()
    if pattern is None:
        return 1.0 if text and "\n" not in text else 0.0
    return 1.0 if _compiled(pattern).fullmatch(text) else 0.0


def length_penalty(prompt: str, response: str, reference: Optional[str], metadata: dict,
                   target: int = 256, coef: float = 0.01, unit: str = "chars") -> float:
    """-coef per unit of length beyond `target` (0.0 up to it). unit: chars, words
    (whitespace-separated) or tokens (needs `metadata["response_ids"]`, which items made
    from engine generations carry)."""
    if unit == "chars":
        length = len(response)
    elif unit == "words":
        length = len(response.split())
    elif unit == "tokens":
        if "response_ids" not in metadata:
            raise ValueError("unit 'tokens' needs metadata['response_ids'] (build items with "
                             "RewardItem.from_generation), or use unit 'chars' or 'words'")
        length = len(metadata["response_ids"])
    else:
        raise ValueError(f"unit must be chars, words or tokens, got {unit!r}")
    over = max(0, length - target)
    return -coef * over if over else 0.0


def overlong_penalty(prompt: str, response: str, reference: Optional[str], metadata: dict,
                     max_tokens: int = 256, buffer: int = 64) -> float:
    """DAPO's soft overlong punishment on the response's token count L (from
    `metadata["response_ids"]`): 0 up to max_tokens - buffer, then falling linearly to -1
    at max_tokens, -1 beyond. Set max_tokens to algo.max_new_tokens."""
    if "response_ids" not in metadata:
        raise ValueError("overlong_penalty counts tokens: it needs metadata['response_ids'] (build items with "
                         "RewardItem.from_generation)")
    length, start = len(metadata["response_ids"]), max_tokens - buffer
    if length <= start:
        return 0.0
    return -1.0 if length >= max_tokens else (start - length) / buffer


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


def _check_format(params: dict) -> None:
    if params.get("pattern") is not None:
        try:
            _compiled(str(params["pattern"]))
        except re.error as exc:
            raise ValueError(f"pattern {params['pattern']!r} is not a valid regular expression: {exc}") from None


def _check_length_penalty(params: dict) -> None:
    if params.get("unit", "chars") not in ("chars", "words", "tokens"):
        raise ValueError(f"unit must be chars, words or tokens, got {params['unit']!r}")
    if not isinstance(params.get("target", 0), int) or params.get("target", 0) < 0:
        raise ValueError(f"target must be an integer >= 0, got {params['target']!r}")


def _check_overlong_penalty(params: dict) -> None:
    max_tokens, buffer = params.get("max_tokens", 256), params.get("buffer", 64)
    if not (isinstance(max_tokens, int) and isinstance(buffer, int) and 0 < buffer <= max_tokens):
        raise ValueError(f"max_tokens and buffer must be integers with 0 < buffer <= max_tokens, got "
                         f"{max_tokens!r} and {buffer!r}")


# Config name -> (function, the check of its params that would otherwise fail only at the
# first call). `format` is `format_check` here, not to shadow Python's format.
BUILTINS: dict[str, tuple[RuleFn, Optional[Callable[[dict], None]]]] = {
    "exact_match": (exact_match, None),
    "format": (format_check, _check_format),
    "length_penalty": (length_penalty, _check_length_penalty),
    "overlong_penalty": (overlong_penalty, _check_overlong_penalty),
    "code_tests": (code_reward.code_tests, code_reward.check_params),
    "llm_judge": (judge_reward.llm_judge, judge_reward.check_params),
}


def builtin_name(ref: str) -> Optional[str]:
    """`exact_match` or `rayft:exact_match` -> "exact_match"; None for anything else."""
    name = ref[len("rayft:"):] if ref.startswith("rayft:") else ref
    return name if name in BUILTINS else None


def resolve_rule(ref: str, params: dict) -> RuleFn:
    """The function `ref` names, checked to accept the rule arguments and `params`."""
    name = builtin_name(ref)
    if name is not None:
        fn, check = BUILTINS[name]
        try:
            if check is not None:
                check(params)
        except ValueError as exc:
            raise RewardError(f"reward '{ref}': {exc}", reward=ref) from None
    else:
        fn = _import_function(ref)
    try:
        inspect.signature(fn).bind("", "", None, {}, **params)
    except TypeError as exc:
        raise RewardError(f"reward '{ref}': cannot be called as fn(prompt, response, reference, metadata, "
                          f"**params) with params {sorted(params)}: {exc}", reward=ref) from None
    except ValueError:
        pass  # builtins without an introspectable signature: checked at the first call
    return fn


def _import_function(ref: str) -> RuleFn:
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr:
        raise RewardError(f"reward '{ref}': expected 'module:function', 'path/to/file.py:function', "
                          f"'model:DIR' or a built-in ({', '.join(BUILTINS)})", reward=ref)
    if where == "rayft":
        raise RewardError(f"reward '{ref}': no built-in '{attr}' (built-ins: {', '.join(BUILTINS)})", reward=ref)
    try:
        fn = import_object(ref, "function")
    except RefError as exc:
        raise RewardError(f"reward '{ref}': {exc}", reward=ref) from None
    if not callable(fn):
        raise RewardError(f"reward '{ref}': '{where}:{attr}' is a {type(fn).__name__}, not a function", reward=ref)
    return fn
