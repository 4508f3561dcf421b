"""Multi-turn episodes without Ray: a real in-process engine (the transformers one) over
the tiny model taught to end its turns, episodes assembled into trajectories that are
exactly what the chat template renders, sampled tokens carrying loss and the engine's
own log-probs, inserted ones carrying neither; budgets; the tool and environment parts."""

import json

import pytest
import torch

from rollout.engine import Sampling
from rollout.environment import EnvError, Turn, load_environment
from rollout.environments import Calculator, GuessNumber
from rollout.episodes import EpisodeRunner
from rollout.tools import Tool, describe_tools, parse_tool_calls, run_call, with_tools
from trainers.data.records import Prompt
from trainers.rl.experience import build_experience


@pytest.fixture(scope="module")
def terse_model(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """The tiny model after a few steps on conversations whose every answer is "ok": it
    ends each turn with <|im_end|>, so episodes run several turns."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    talks = [[{"role": "user", "content": q}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": f"again {k}"}, {"role": "assistant", "content": "ok"}]
             for k, q in enumerate(["hi", "hello there", "what now", "go"])]
    batch = [torch.tensor(tiny_tokenizer.apply_chat_template(t, tokenize=True, return_dict=True)["input_ids"])
             for t in talks]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        for ids in batch:
            loss = model(input_ids=ids[None], labels=ids[None]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    out = tmp_path_factory.mktemp("terse")
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


class EnginePool:
    """The pool's submit / result over one in-process engine."""

    def __init__(self, engine):
        self.engine, self.done = engine, {}

    def submit(self, prompts, sampling):
        self.done[len(self.done)] = self.engine.generate(prompts, sampling)
        return len(self.done) - 1

    def result(self, ticket):
        return self.done[ticket]


class Again:
    """Answers every turn with "again N"; done after `turns`, 0.25 reward a turn."""
    tools: list = []

    def __init__(self, turns=3):
        self.turns = turns

    def reset(self, prompt, reference, metadata):
        self.n = 0
        return prompt

    def step(self, message):
        self.n += 1
        done = self.n >= self.turns
        return Turn([{"role": "user", "content": f"again {self.n}"}], reward=0.25, done=done, success=done)


@pytest.fixture(scope="module")
def engine(terse_model):
    from rollout.hf_engine import HFEngine

    return HFEngine(terse_model)


def runner(engine, env=Again, **kwargs):
    return EpisodeRunner(EnginePool(engine), engine.tokenizer, env, **{"max_turns": 5, **kwargs})


def segments(ids, mask, wanted):
    out, current = [], []
    for token, m in zip(ids + [None], mask + [None]):
        if m == wanted:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    return out


def test_an_episode_is_the_rendered_conversation_with_loss_only_on_sampled_tokens(engine):
    tok = engine.tokenizer
    [group] = runner(engine).run([Prompt([{"role": "user", "content": "hi"}])],
                                 Sampling(n=2, temperature=1.0, max_new_tokens=8, seed=3))
    assert len(group) == 2
    for g in group:
        assert (g.turns, g.episode_reward, g.success, g.finish_reason) == (3, 0.75, True, "stop")
        sampled, inserted = segments(g.response_ids, g.loss_mask, 1), segments(g.response_ids, g.loss_mask, 0)
        assert len(sampled) == 3 and all(s[-1] == tok.eos_token_id for s in sampled)
        assert [tok.decode(s) for s in inserted] == [
            f"\n<|im_start|>user\nagain {k}<|im_end|>\n<|im_start|>assistant\n" for k in (1, 2)]
        said = [tok.decode(s[:-1]) for s in sampled]
        conversation = [{"role": "user", "content": "hi"}]
        for k, text in enumerate(said):
            conversation += [{"role": "assistant", "content": text}] + ([{"role": "user", "content": f"again {k + 1}"}]
                                                                         if k < 2 else [])
        rendered = tok.apply_chat_template(conversation, tokenize=False)
        assert rendered == tok.decode(g.prompt_ids + g.response_ids) + "\n"  # all but the whitespace after the end
        assert g.text == said[-1]
        # The engine's log-probs on its sampled tokens are those of the whole trajectory, teacher-forced.
        [scored] = engine.score([g.prompt_ids], [g.response_ids])
        for k, m in enumerate(g.loss_mask):
            assert abs(g.logprobs[k] - scored[k]) < 1e-4 if m else g.logprobs[k] == 0.0


def test_the_experience_masks_inserted_tokens_and_keeps_their_length(engine):
    [group] = runner(engine).run([Prompt([{"role": "user", "content": "go"}])],
                                 Sampling(n=2, temperature=1.0, max_new_tokens=8, seed=5))
    exp = build_experience(group, [g.episode_reward for g in group], engine.tokenizer.pad_token_id)
    for row, g in enumerate(group):
        assert exp.mask[row, :len(g.loss_mask)].tolist() == [float(m) for m in g.loss_mask]
        assert exp.mask[row].sum() == sum(g.loss_mask) < len(g.response_ids) == exp.response_lengths[row]


def test_budgets_end_episodes(engine):
    prompt = [Prompt([{"role": "user", "content": "hi"}])]
    sampling = Sampling(n=1, temperature=1.0, max_new_tokens=8, seed=3)
    [[g]] = runner(engine, max_turns=2).run(prompt, sampling)
    assert g.turns == 2 and g.success is False and g.episode_reward == 0.5
    [[g]] = runner(engine, max_tokens=20).run(prompt, sampling)
    assert g.finish_reason == "length" and len(g.response_ids) <= 20 and g.turns < 3


def test_greedy_episodes_of_one_context_share_one_sample(engine):
    """Greedy decoding refuses n > 1 on vLLM; identical contexts (the same prompt twice, then
    identical turns) are asked once with n = 1 and every episode gets that turn."""
    class Counting(EnginePool):
        def submit(self, prompts, sampling):
            self.asked = getattr(self, "asked", []) + [sampling.n]
            return super().submit(prompts, sampling)

    pool = Counting(engine)
    hi = Prompt([{"role": "user", "content": "hi"}])
    groups = EpisodeRunner(pool, engine.tokenizer, Again, max_turns=3).run(
        [hi, hi], Sampling(n=2, temperature=0.0, max_new_tokens=8))
    episodes = [g for group in groups for g in group]
    assert pool.asked == [1, 1, 1]
    assert len(episodes) == 4 and all(g.turns == 3 for g in episodes)
    assert len({tuple(g.response_ids) for g in episodes}) == 1


def test_environment_errors_name_the_environment(engine):
    class Broken(Again):
        def step(self, message):
            raise KeyError("boom")

    with pytest.raises(EnvError, match=r"test env: step raised on prompt 0: KeyError: 'boom'"):
        runner(engine, env=Broken, name="test env").run([Prompt([{"role": "user", "content": "hi"}])],
                                                       Sampling(n=1, temperature=0.0, max_new_tokens=8))
    with pytest.raises(EnvError, match="no built-in 'calc'"):
        load_environment("rayft:calc", {})
    with pytest.raises(EnvError, match=r"environment 'nowhere_xyz:Env': cannot import module"):
        load_environment("nowhere_xyz:Env", {})
    with pytest.raises(EnvError, match="cannot be created with rollout.env_params"):
        load_environment("rayft:calculator", {"tools": 3})
    assert isinstance(load_environment("rayft:guess_number", {"high": 50})(), GuessNumber)


def test_the_calculator_environment_rewards_a_right_answer_fully_only_with_the_tool():
    env = Calculator()
    env.reset([{"role": "user", "content": "What is 482 + 317?"}], "799", {})
    call = '<tool_call>{"name": "calculator", "arguments": {"a": 482, "op": "+", "b": 317}}</tool_call>'
    turn = env.step(call)
    assert turn.messages == [{"role": "tool", "name": "calculator", "content": "799"}] and not turn.done
    assert env.step("799") == Turn(reward=1.0, done=True, success=True)
    env.reset([], "799", {})
    assert env.step("799") == Turn(reward=0.5, done=True, success=True)
    env.reset([], "799", {})
    assert env.step(" 800 ") == Turn(reward=0.0, done=True, success=False)


@pytest.mark.parametrize("text, error", [
    ('<tool_call>{"name": "calculator", "arguments": {"a": "1", "op": "+", "b": 2}}</tool_call>',
     "error: argument 'a' must be of type integer"),
    ('<tool_call>{"name": "calculator", "arguments": {"a": true, "op": "+", "b": 2}}</tool_call>',
     "error: argument 'a' must be of type integer"),
    ('<tool_call>{"name": "calculator", "arguments": {"a": 1, "op": "/", "b": 2}}</tool_call>',
     "error: argument 'op' must be one of ['+', '-', '*'], got '/'"),
    ('<tool_call>{"name": "calculator", "arguments": {"a": 1, "b": 2, "c": 3}}</tool_call>',
     "error: missing ['op'] unknown ['c'] (takes ['a', 'op', 'b'])"),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "error: no tool 'search' (tools: calculator)"),
    ('<tool_call>{"name": calculator}</tool_call>', "error: the tool call is not valid JSON"),
    ('<tool_call>["calculator"]</tool_call>', 'error: a tool call is {"name": ..., "arguments": {...}}'),
    ('<tool_call>{"name": "calculator", "arguments": {"a": 1e400, "op": "*", "b": 2}}</tool_call>',
     "error: argument 'a' must be of type integer"),
    ('<tool_call>{"name": "calculator", "arguments": {"a": 99999999999999999999, "op": "*", "b": 2}}</tool_call>',
     "error: ValueError: the operands are too large"),
])
def test_malformed_calls_get_an_error_message_back(text, error):
    env = Calculator()
    env.reset([], "1", {})
    turn = env.step(text)
    assert not turn.done and turn.messages[0]["role"] == "tool" and turn.messages[0]["content"].startswith(error)
    assert env.calls == 0


def test_tool_calls_parse_and_run_in_order():
    tools = {"calculator": Calculator.tools[0],
             "shout": Tool(lambda text: text.upper(), "shout", {"text": {"type": "string"}}, name="shout")}
    calls = parse_tool_calls('a <tool_call> {"name": "shout", "arguments": {"text": "hi"}} </tool_call> b '
                             '<tool_call>{"name": "calculator", "arguments": {"a": 5, "op": "*", "b": -4}}</tool_call>')
    assert [run_call(c, tools)["content"] for c in calls] == ["HI", "-20"]
    assert parse_tool_calls("no calls here") == []


def test_tools_reach_the_prompt_through_the_template_or_a_system_message(tiny_tokenizer):
    tool = Calculator.tools[0]
    messages = [{"role": "user", "content": "q"}]
    with_system, arg = with_tools(messages, [tool], tiny_tokenizer)   # ChatML without tool support
    assert arg is None and with_system[0] == {"role": "system", "content": describe_tools([tool])}
    merged, _ = with_tools([{"role": "system", "content": "Be brief."}] + messages, [tool], tiny_tokenizer)
    assert merged[0]["content"].startswith("Be brief.\n\nYou can call these tools") and len(merged) == 2

    class TemplateWithTools:
        chat_template = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}"

    same, schemas = with_tools(messages, [tool], TemplateWithTools())
    assert same == messages and schemas == [tool.schema]
    assert json.loads(json.dumps(schemas))[0]["function"]["parameters"]["required"] == ["a", "op", "b"]


def test_the_guessing_game_gives_feedback_and_pays_for_few_guesses():
    game = GuessNumber(cost_per_guess=0.25)
    game.reset([], "7", {})
    assert [game.step(m).messages[0]["content"] for m in ("5", "I say 9", "hmm")] == [
        "Higher.", "Lower.", "Guess a number between 1 and 100."]
    assert game.step("7") == Turn([{"role": "user", "content": "Correct!"}], reward=0.5, done=True, success=True)
    with pytest.raises(ValueError, match="secret number"):
        GuessNumber().reset([], None, {})


def test_inserted_tokens_get_no_gradient_from_the_objective(engine):
    """Through the GRPO objective (entropy bonus and KL on), the loss's gradient reaches
    the logits of sampled tokens only, never those predicting inserted ones."""
    from trainers.rl.config import AlgoConfig
    from trainers.rl.experience import at_response, sampled_and_raw_logp
    from trainers.rl.objectives import AdaptiveKL, GroupRL

    [group] = runner(engine).run([Prompt([{"role": "user", "content": "hi"}])],
                                 Sampling(n=2, temperature=1.0, max_new_tokens=8, seed=3))
    exp = build_experience(group, [1.0, 0.0], engine.tokenizer.pad_token_id)
    algo = AlgoConfig(samples_per_prompt=2, entropy_coef=0.01, kl_coef=0.1)
    objective = GroupRL(algo, AdaptiveKL(0.1, 0, 1), 1.0)
    with torch.no_grad():
        logits = engine.base(input_ids=exp.input_ids, attention_mask=exp.attention_mask,
                             position_ids=exp.position_ids).logits
    exp.old_logp = sampled_and_raw_logp(at_response(logits, exp), exp.response_ids, 1.0)[0].detach()
    exp.ref_logp = exp.old_logp - 0.1
    objective.prepare(exp, 2)
    leaf = (logits + 0.01 * torch.randn_like(logits)).requires_grad_()  # off the old policy: ratios move
    response_logits = at_response(leaf, exp)
    logp, _ = sampled_and_raw_logp(response_logits, exp.response_ids, 1.0)
    loss, _ = objective.loss(response_logits, logp, None, exp)
    loss.backward()
    per_position = at_response(leaf.grad, exp).abs().sum(-1)
    assert (per_position[exp.mask == 0] == 0).all()
    assert (per_position[exp.mask == 1] > 0).all()
