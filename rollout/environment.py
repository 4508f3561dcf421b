"""Environments for multi-turn episodes: the interface a user implements, the tool-calling
base most environments build on, and loading one from `rollout.environment`.

An environment is a class; one instance plays one episode:

    class MyEnv:
        tools = []                                    # optional: rollout.tools.Tool list
        describe_tools = True                         # optional: False keeps them out of the prompt
        def __init__(self, **params): ...             # rollout.env_params
        def reset(self, prompt, reference, metadata):  # the prompt row's messages, reference, metadata
            return prompt                             # the messages the episode starts from
        def step(self, message: str) -> Turn:         # the assistant's reply (text)
            return Turn(messages=[{"role": "user", "content": "try again"}], reward=0.0, done=False)

The episode runner (`rollout.episodes`) renders the start with the chat template (and
the tools), generates the assistant's turn, hands its text to `step`, appends the
returned messages (tool results, a user turn) as tokens that carry no loss, and repeats
until `done`, `rollout.max_turns` or the token budget. The episode's reward is the sum of
its turns' rewards (plus the run's `rewards`, scored on the last assistant message, when
the config has any); `success`, when an environment reports it, is logged as
`eval_success` and `success`.

References: a built-in (`rayft:calculator`, `rayft:guess_number`, see
`rollout.environments`), `my_pkg.envs:MyEnv`, or `path/to/envs.py:MyEnv`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

from rollout.refs import RefError, import_object
from rollout.tools import Tool, parse_tool_calls, run_call


class EnvError(ValueError):
    """An environment could not be loaded or misbehaved; the message names it."""


@dataclass
class Turn:
    """What the environment answers to one assistant message."""
    messages: list[dict] = field(default_factory=list)   # appended before the next assistant turn
    reward: float = 0.0
    done: bool = False
    success: Optional[bool] = None                       # did the episode achieve its goal (for logging)


class ToolEnvironment:
    """An environment whose assistant may call `tools` before answering: a reply with tool
    calls gets one tool message per call and the episode goes on; a reply without any is
    the answer, judged by `finish`. `calls` counts the well-formed calls made so far.
    `describe_tools` False leaves the tools out of the prompt, for a model fine-tuned on
    transcripts of their calls."""
    tools: list[Tool] = []
    describe_tools: bool = True

    def __init__(self):
        self.calls = 0

    def reset(self, prompt: list[dict], reference: Optional[str], metadata: dict) -> list[dict]:
        self.reference, self.metadata, self.calls = reference, metadata, 0
        return prompt

    def step(self, message: str) -> Turn:
        calls = parse_tool_calls(message)
        if not calls:
            return self.finish(message)
        by_name = {tool.name: tool for tool in self.tools}
        replies = [run_call(call, by_name) for call in calls]
        self.calls += sum(not reply["content"].startswith("error:") for reply in replies)
        return Turn(messages=replies)

    def finish(self, answer: str) -> Turn:
        raise NotImplementedError


def load_environment(ref: str, params: dict):
    """A factory of fresh environment instances for `ref`, checked now: the class takes
    `params`, has reset and step, and its tools are Tool objects."""
    from rollout.environments import BUILTINS

    name = ref[len("rayft:"):] if ref.startswith("rayft:") else None
    if name is not None:
        if name not in BUILTINS:
            raise EnvError(f"environment '{ref}': no built-in '{name}' (built-ins: {', '.join(BUILTINS)})")
        cls = BUILTINS[name]
    else:
        try:
            cls = import_object(ref, "class")
        except RefError as exc:
            raise EnvError(f"environment '{ref}': {exc}") from None
    if not inspect.isclass(cls):
        raise EnvError(f"environment '{ref}' is a {type(cls).__name__}, not a class")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise EnvError(f"environment '{ref}' has no {' or '.join(missing)} method")
    try:
        inspect.signature(cls).bind(**params)
    except TypeError as exc:
        raise EnvError(f"environment '{ref}' cannot be created with rollout.env_params "
                                f"{sorted(params)}: {exc}") from None
    bad = [t for t in getattr(cls, "tools", []) if not isinstance(t, Tool)]
    if bad:
        raise EnvError(f"environment '{ref}': tools must be rollout.tools.Tool objects, got {bad[0]!r}")
    return lambda: cls(**params)
