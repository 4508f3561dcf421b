"""Multi-turn episodes on the engine pool: every episode of a step advances one turn per
round, all of a round's turns in one request to the pool (so they run concurrently
across its engines), until each is done.

    runner = EpisodeRunner(pool, tokenizer, load_environment("rayft:calculator", {}), max_turns=4)
    groups = runner.run(records, sampling)   # list[list[Generation]], n per record, like pool.generate

An episode becomes one `Generation` over the whole trajectory: `prompt_ids` is the
rendered start (with the tools), `response_ids` every token after it, the assistant's
sampled tokens (`loss_mask` 1, with the engine's log-probs) and the tokens of the
messages the environment inserted between turns (`loss_mask` 0, log-prob 0). Sampled
tokens are kept as sampled, never re-tokenised; inserted ones are the chat template's
rendering of the new messages, found as the difference between the conversation
rendered with and without them, so the trajectory is exactly what the template would
render. `text` is the last assistant message, `episode_reward` the sum of the turns'
rewards, `policy_version` the oldest weights any of its turns was sampled with.

Budgets: `max_turns` assistant turns; each turn at most `sampling.max_new_tokens`
tokens; with `max_tokens`, the whole response side (sampled and inserted) at most that
many (the last turn's budget shrinks to fit, and an episode out of budget ends with
finish_reason "length").
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from rollout.engine import Generation, Sampling
from rollout.environment import EnvError, Turn
from rollout.tools import with_tools


@dataclass
class Episode:
    env: object
    prompt_index: int
    sample_index: int
    messages: list[dict]                # the conversation so far, as the template renders it
    tools: Optional[list[dict]]         # the apply_chat_template `tools` argument
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    reward: float = 0.0
    success: Optional[bool] = None
    text: str = ""
    turns: int = 0
    finish_reason: str = "stop"
    done: bool = False

    def generation(self) -> Generation:
        return Generation(self.prompt_index, self.sample_index, self.prompt_ids, self.ids, self.text, self.logprobs,
                          self.finish_reason, min(self.versions, default=0), loss_mask=self.mask,
                          episode_reward=self.reward, success=self.success, turns=self.turns)


class EpisodeRunner:
    def __init__(self, pool, tokenizer, make_env: Callable[[], object], max_turns: int, max_tokens: int = 0,
                 name: str = "environment"):
        self.pool, self.tokenizer, self.make_env = pool, tokenizer, make_env
        self.max_turns, self.max_tokens, self.name = max_turns, max_tokens, name
        self.eos_id = tokenizer.eos_token_id
        self._threads: Optional[ThreadPoolExecutor] = None

    def run(self, records: list, sampling: Sampling) -> list[list[Generation]]:
        """`sampling.n` episodes per record (a prompt record: prompt_messages, reference)."""
        episodes = [self.start(record, i, k) for i, record in enumerate(records) for k in range(sampling.n)]
        for turn in range(self.max_turns):
            active = [e for e in episodes if not e.done]
            if not active:
                break
            self.advance(active, replace(sampling, seed=None if sampling.seed is None else sampling.seed + 7919 * turn),
                         last=turn == self.max_turns - 1)
        by_record: list[list[Generation]] = [[] for _ in records]
        for e in episodes:
            by_record[e.prompt_index].append(e.generation())
        return by_record

    def submit(self, records: list, sampling: Sampling) -> Future:
        """`run` in a background thread (pipelined rollouts)."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="episodes")
        return self._threads.submit(self.run, records, sampling)

    # -- one episode ------------------------------------------------------------------------

    def start(self, record, prompt_index: int, sample_index: int) -> Episode:
        env = self.make_env()
        messages = self._call(env.reset, "reset", prompt_index, [dict(m) for m in record.prompt_messages],
                              record.reference, {})
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise EnvError(f"{self.name}: reset must return the start messages (a non-empty list of "
                           f"{{role, content}}), got {type(messages).__name__}")
        offered = list(getattr(env, "tools", [])) if getattr(env, "describe_tools", True) else []
        messages, tools = with_tools(messages, offered, self.tokenizer)
        ids = self.tokenizer(self.render(messages, tools, True), add_special_tokens=False)["input_ids"]
        return Episode(env, prompt_index, sample_index, messages, tools, list(ids))

    def advance(self, active: list[Episode], sampling: Sampling, last: bool) -> None:
        """One assistant turn for every active episode, then the environment's answers."""
        requests: dict[tuple, list[Episode]] = {}
        for e in active:
            budget = sampling.max_new_tokens
            if self.max_tokens:
                budget = min(budget, self.max_tokens - len(e.ids))
            if budget < 1:
                e.done, e.finish_reason = True, "length"
                continue
            requests.setdefault((budget, tuple(e.prompt_ids + e.ids)), []).append(e)
        # Episodes with the same context (the first turn's samples of one prompt) share one
        # prompt with n samples; one pool call per (n, budget), all in flight together.
        # Greedy decoding gives every episode of a group the same turn: one sample serves all.
        greedy = sampling.temperature == 0
        calls: dict[tuple[int, int], list[list[Episode]]] = {}
        for (budget, _), group in requests.items():
            calls.setdefault((1 if greedy else len(group), budget), []).append(group)
        tickets = [(groups, self.pool.submit([g[0].prompt_ids + g[0].ids for g in groups],
                                             replace(sampling, n=n, max_new_tokens=budget)))
                   for (n, budget), groups in calls.items()]
        for groups, ticket in tickets:
            for group, generations in zip(groups, self.pool.result(ticket)):
                for e, g in zip(group, generations * len(group) if greedy else generations):
                    self.after_turn(e, g, last)

    def after_turn(self, e: Episode, g: Generation, last: bool) -> None:
        e.ids += g.response_ids
        e.mask += [1] * len(g.response_ids)
        e.logprobs += list(g.logprobs[:len(g.response_ids)])
        e.versions.append(g.policy_version)
        e.text, e.turns = g.text, e.turns + 1
        if g.finish_reason == "length":
            e.done, e.finish_reason = True, "length"
            return
        turn = self._call(e.env.step, "step", e.prompt_index, g.text)
        if not isinstance(turn, Turn):
            raise EnvError(f"{self.name}: step must return a rollout.environment.Turn, got {type(turn).__name__}")
        e.reward += float(turn.reward)
        e.success = turn.success if turn.success is not None else e.success
        if turn.done or last or not turn.messages:
            e.done = True
            return
        inserted = self.continuation(e, g, turn.messages)
        if self.max_tokens and len(e.ids) + len(inserted) >= self.max_tokens:
            e.done, e.finish_reason = True, "length"  # no room left for another turn
            return
        e.ids += inserted
        e.mask += [0] * len(inserted)
        e.logprobs += [0.0] * len(inserted)
        e.messages += [{"role": "assistant", "content": g.text}, *turn.messages]

    def continuation(self, e: Episode, g: Generation, new: list[dict]) -> list[int]:
        """Token ids that follow the sampled turn: the rest of the assistant turn's closing
        (what the template adds after the content, less the stop token the model sampled)
        and the new messages, up to the next assistant turn's opening."""
        assistant = {"role": "assistant", "content": g.text}
        opened = self.render(e.messages, e.tools, True)
        closed = self.render(e.messages + [assistant], e.tools, False)
        following = self.render(e.messages + [assistant] + new, e.tools, True)
        if not (closed.startswith(opened + g.text) and following.startswith(closed)):
            raise EnvError(f"{self.name}: the chat template does not render an appended turn as a continuation "
                           "of the conversation (it rewrites earlier turns), so a trajectory cannot be built "
                           "from it; set data.chat_template to one that does")
        closing = closed[len(opened) + len(g.text):]
        if g.response_ids and g.response_ids[-1] == self.eos_id:
            stop = self.tokenizer.decode([self.eos_id])
            closing = closing[len(stop):] if closing.startswith(stop) else closing
        return list(self.tokenizer(closing + following[len(closed):], add_special_tokens=False)["input_ids"])

    def render(self, messages: list[dict], tools, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _call(self, method, what: str, prompt_index: int, *args):
        try:
            return method(*args)
        except EnvError:
            raise
        except Exception as exc:  # noqa: BLE001 (user code: name the environment and the prompt)
            raise EnvError(f"{self.name}: {what} raised on prompt {prompt_index}: {type(exc).__name__}: {exc}") from exc
