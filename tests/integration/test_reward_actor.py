"""Reward actors on a local Ray cluster: two actors score a batch with a reward model
and rule functions (model rewards equal a direct forward pass; a model built to prefer a
word shows it), and a failing rule, a bad reference or a hung rule reach the caller as a
`RewardError` that names them, through `ray.get`. Behind `RewardService` (as an RL run
holds them), a SIGKILLed actor is restarted once for two callers and its share re-scored."""

import os
import signal
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from rollout.reward_actor import RewardActor, RewardService, score_batch, start_reward_actors, stop_reward_actors
from rollout.rewards import RewardError, RewardItem, RewardSpec, RewardTerm

RULES = textwrap.dedent('''
    import time

    def picky(prompt, response, reference, metadata):
        if response == "crash":
            return 1 / 0
        if response == "none":
            return None
        return float(len(response))

    def sleepy(prompt, response, reference, metadata):
        time.sleep(60)
        return 0.0
    ''')


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "rules.py"
    path.write_text(RULES)
    return path


@pytest.fixture(scope="module")
def likes_great_rm(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """A run directory whose final/ is a reward model that reads one feature we control:
    embedding dimension 0 is non-zero only for the tokens of 'great'; attention averages
    the sequence (q = 0, v = o = identity), the MLPs are off, and the head reads dimension
    0 at the last token. So the reward is > 0 exactly when the response contains 'great'."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=1, id2label={0: "reward"}, label2id={"reward": 0})
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    great = tiny_tokenizer("great", add_special_tokens=False)["input_ids"]
    h = model.config.hidden_size
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[great] = 0.0
        emb[great, 0] = 1.0
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.v_proj.weight.copy_(torch.eye(h))
            layer.self_attn.o_proj.weight.copy_(torch.eye(h) if i == 0 else torch.zeros(h, h))
            layer.mlp.down_proj.weight.zero_()
        model.score.weight.zero_()
        model.score.weight[0, 0] = 1.0
    run = tmp_path_factory.mktemp("rm_run")
    model.save_pretrained(run / "final")
    tiny_tokenizer.save_pretrained(run / "final")
    return run


ITEMS = [RewardItem("How was the film?", "great", "great"),
         RewardItem("How was the film?", "awful", "great"),
         RewardItem([{"role": "system", "content": "One word."}, {"role": "user", "content": "And the music?"}],
                    "great", None),
         RewardItem("What is 23 + 45?", "68", "68"),
         RewardItem("What is 23 + 45?", "sixty", "68")]


@pytest.fixture(scope="module")
def actors(ray_cluster, likes_great_rm, rules_file):
    spec = RewardSpec([RewardTerm(f"model:{likes_great_rm}", params={"batch_size": 2}),
                       RewardTerm(f"{rules_file}:picky", weight=0.5)], num_actors=2)
    handles = start_reward_actors(spec)
    yield handles
    stop_reward_actors(handles)


def direct_rewards(model_dir, tokenizer, items):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    out = []
    for item in items:
        text = tokenizer.apply_chat_template([*item.prompt, {"role": "assistant", "content": item.response}],
                                             tokenize=False)
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]))
                       .logits[0, 0].item())
    return out


def test_actors_score_a_batch_with_a_reward_model_and_a_rule(actors, likes_great_rm, tiny_tokenizer):
    results = score_batch(actors, ITEMS, timeout_s=60)  # shards of 3 and 2, one per actor
    expected = direct_rewards(likes_great_rm / "final", tiny_tokenizer, ITEMS)
    model_values = [r.terms["reward_model"] for r in results]
    assert model_values == pytest.approx(expected, abs=1e-5)
    # the model prefers what it was built to prefer
    assert model_values[0] > 1.0 and model_values[2] > 1.0
    assert model_values[1] == pytest.approx(0.0, abs=1e-6) and model_values[3] == pytest.approx(0.0, abs=1e-6)
    assert [r.terms["picky"] for r in results] == [5.0, 5.0, 5.0, 2.0, 5.0]
    assert [r.reward for r in results] == pytest.approx([m + 0.5 * len(i.response) for m, i in zip(expected, ITEMS)],
                                                        abs=1e-5)


def test_a_failing_rule_reaches_ray_get_as_a_named_reward_error(actors):
    batch = ITEMS[:3] + [RewardItem("What is 23 + 45? Answer with digits only, no words at all please.", "crash")]
    message = r"reward '.*rules.py:picky' raised on sample 3 \(prompt 'What is 23 \+ 45\? Answer with .*\.\.\.'\): Zero"
    with pytest.raises(RewardError, match=message) as info:
        score_batch(actors, batch, timeout_s=60)  # sample 3 is the second actor's second item
    assert isinstance(info.value, ray.exceptions.RayTaskError)
    # the same through a bare ray.get on one actor; the actor survives to score again
    with pytest.raises(RewardError, match=r"picky' returned None \(NoneType\) on sample 7 \(prompt 'Hi'\)"):
        ray.get(actors[0].score.remote([RewardItem("Hi", "none")], 7), timeout=60)
    assert ray.get(actors[0].score.remote([ITEMS[3]]), timeout=60)[0].terms["picky"] == 2.0


def test_a_bad_reference_reaches_the_caller_as_a_named_reward_error(ray_cluster, rules_file):
    with pytest.raises(RewardError, match=r"reward 'no_such_rules_module:score': cannot import module"):
        start_reward_actors(RewardSpec([RewardTerm("exact_match"), RewardTerm("no_such_rules_module:score")]))
    actor = ray.remote(RewardActor).options(num_cpus=0.5).remote(RewardSpec([RewardTerm(f"{rules_file}:absent")]))
    with pytest.raises(RewardError, match=r"rules.py' has no function 'absent'"):
        ray.get(actor.score.remote(ITEMS), timeout=60)
    ray.kill(actor)


def test_a_hung_rule_is_a_timeout_not_a_hang(ray_cluster, rules_file):
    spec = RewardSpec([RewardTerm(f"{rules_file}:sleepy")], cpus_per_actor=0.5, timeout_s=30)
    handles = start_reward_actors(spec)
    try:
        with pytest.raises(RewardError, match=r"did not score a batch of 1 within 1 s"):
            score_batch(handles, ITEMS[:1], timeout_s=1)
    finally:
        stop_reward_actors(handles)


def _sigkill(actor) -> None:
    """SIGKILL the actor's own process (a real death; nothing else on the machine touched)."""
    os.kill(ray.get(actor.pid.remote(), timeout=60), signal.SIGKILL)


def test_a_killed_reward_actor_is_restarted_once_and_its_share_rescored(ray_cluster, rules_file):
    """Two callers (as two training workers) score while one of two actors is SIGKILLed:
    both get every result, and the owner replaced the actor once."""
    service = RewardService(RewardSpec([RewardTerm(f"{rules_file}:picky")], num_actors=2, cpus_per_actor=0.5,
                                       timeout_s=120), max_retries=2)
    try:
        expected = [5.0, 5.0, 5.0, 2.0, 5.0]
        assert [r.reward for r in service.score(ITEMS)] == expected
        _sigkill(service.actors.handles()[1])
        with ThreadPoolExecutor(2) as callers:
            results = list(callers.map(lambda _: service.score(ITEMS), range(2)))
        assert [[r.reward for r in rs] for rs in results] == [expected, expected]
        assert ray.get(service.actors.owner.generations.remote(), timeout=60) == [0, 1]
    finally:
        service.stop()


def test_a_hung_rule_behind_the_service_is_a_timeout_not_a_restart(ray_cluster, rules_file):
    service = RewardService(RewardSpec([RewardTerm(f"{rules_file}:sleepy")], cpus_per_actor=0.5, timeout_s=2))
    try:
        with pytest.raises(RewardError, match=r"reward actor 0 did not answer within 2 s"):
            service.score(ITEMS[:1])
        assert ray.get(service.actors.owner.generations.remote(), timeout=60) == [0]
    finally:
        service.stop()
