"""The RL loop's parts without Ray: the experience layout (left-padded prompts,
right-padded responses, logits aligned with the tokens they predict), the LoRA merge the
engines receive, the adaptive KL coefficient, and each objective's advantages."""

import pytest
import torch

from rollout.config import RolloutConfig
from rollout.engine import Generation
from trainers.rl.config import AlgoConfig
from trainers.rl.experience import build_experience, at_response, token_logp
from trainers.rl.model import RLModel, merge_lora, policy_state
from trainers.rl.objectives import PPO, AdaptiveKL, GroupRL


def _gen(prompt, response, index=0, sample=0):
    return Generation(index, sample, list(prompt), list(response), "", [-0.5] * len(response), "stop")


def test_experience_layout_and_alignment(tiny_model_dir):
    from trainers.models import load_causal_lm

    model = RLModel(load_causal_lm(tiny_model_dir), with_value_head=False).eval()
    gens = [_gen([5, 6, 7], [8, 9]), _gen([5], [10, 11, 12])]
    exp = build_experience(gens, [1.0, 0.0], pad_id=0)
    assert exp.input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [0, 0, 5, 10, 11, 12]]
    assert exp.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert exp.position_ids[1].tolist()[2:] == [0, 1, 2, 3]
    with torch.no_grad():
        logits, values = model(exp.input_ids, exp.attention_mask, exp.position_ids)
        batched = token_logp(at_response(logits, exp), exp.response_ids)
        for i, g in enumerate(gens):  # each sample alone, unpadded
            ids = torch.tensor([g.prompt_ids + g.response_ids])
            alone = torch.log_softmax(model.policy(ids).logits[0].float(), -1)
            expected = [alone[len(g.prompt_ids) - 1 + j, t] for j, t in enumerate(g.response_ids)]
            assert batched[i, :len(g.response_ids)].tolist() == pytest.approx([float(e) for e in expected], abs=1e-5)
    assert values is None


def test_value_head_gives_one_value_per_position(tiny_model_dir):
    from trainers.models import load_causal_lm

    model = RLModel(load_causal_lm(tiny_model_dir), with_value_head=True)
    exp = build_experience([_gen([5, 6], [7, 8])], [0.0], pad_id=0)
    _, values = model(exp.input_ids, exp.attention_mask, exp.position_ids)
    assert values.shape == exp.input_ids.shape and values.requires_grad


def test_merged_lora_equals_peft_merge(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from trainers.models import load_causal_lm

    policy = get_peft_model(load_causal_lm(tiny_model_dir),
                            LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at 0: make the adapter do something
    state = policy_state(RLModel(policy, False).state_dict())
    merged = merge_lora(state, scaling=16 / 4)
    reference = policy.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name


def test_adaptive_kl_moves_towards_the_target():
    kl = AdaptiveKL(0.1, target=1.0, horizon=100)
    kl.update(kl=3.0, responses=10)
    assert kl.coef == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    kl.update(kl=0.5, responses=10)
    assert kl.coef < 0.1 * 1.02
    fixed = AdaptiveKL(0.1, target=0.0, horizon=100)
    fixed.update(kl=3.0, responses=10)
    assert fixed.coef == 0.1


def _experience(scores, group):
    gens = [_gen([1, 2], [3, 4], index=i // group, sample=i % group) for i in range(len(scores))]
    exp = build_experience(gens, scores, pad_id=0)
    exp.old_logp = torch.full(exp.mask.shape, -1.0)
    return exp


def test_group_estimators_give_each_sample_its_own_advantage():
    scores = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    # group [1, 0, 0]: mean 1/3, sample std sqrt(1/3); the other samples' mean is 0
    for estimator, first in (("grpo", (2 / 3) / (1 / 3) ** 0.5), ("rloo", 1.0)):
        exp = _experience(scores, group=3)
        GroupRL(AlgoConfig(estimator=estimator, samples_per_prompt=3), AdaptiveKL(0, 0, 1), 1.0).prepare(exp, 3)
        assert exp.advantages[0].tolist() == pytest.approx([first] * 2, rel=1e-4)
        assert (exp.advantages[0] > 0).all() and (exp.advantages[1] < 0).all() and (exp.advantages[3] < 0).all()
        assert exp.advantages.sum().abs() < 1e-4  # zero-mean within each group


def test_kl_in_reward_lowers_the_advantage_of_samples_that_drift():
    exp = _experience([1.0, 1.0], group=2)
    exp.ref_logp = exp.old_logp.clone()
    exp.ref_logp[1] -= 2.0  # sample 1 is far more likely under the policy than the reference
    GroupRL(AlgoConfig(estimator="rloo", samples_per_prompt=2, kl_coef=0.1), AdaptiveKL(0.1, 0, 1), 1.0).prepare(exp, 2)
    assert exp.advantages[0, 0] > 0 > exp.advantages[1, 0]


def test_ppo_advantages_come_from_gae_on_the_values():
    exp = _experience([1.0], group=1)
    exp.old_values = torch.tensor([[0.25, 0.5]])
    algo = AlgoConfig(samples_per_prompt=1, gamma=1.0, lam=1.0, whiten_advantages=False)
    PPO(algo, AdaptiveKL(0, 0, 1), 1.0).prepare(exp, 1)
    assert exp.returns.tolist() == [[1.0, 1.0]]
    assert exp.advantages.tolist() == [[0.75, 0.5]]


def _scored(rewards, prompt):
    return [Generation(0, k, [prompt], [prompt, k + 1], "", [-0.5, -0.5], "stop", episode_reward=r)
            for k, r in enumerate(rewards)]


@pytest.mark.parametrize("rounds, kept_prompts, informative_kept", [(3, [2, 4], 1.0), (1, [2, 1], 0.5)])
def test_dynamic_sampling_keeps_groups_whose_rewards_differ(rounds, kept_prompts, informative_kept):
    """Prompt 1's samples all score 1 and prompt 3's all 0 (no signal); 2 and 4 differ. One
    more round finds 4; with no more rounds allowed, the batch is filled with prompt 1."""
    from types import SimpleNamespace

    from trainers.rl.collect import Collector, Services

    algo = AlgoConfig(samples_per_prompt=2, dynamic_sampling=True, max_sampling_rounds=rounds)
    collector = Collector(SimpleNamespace(algo=algo, rollout=RolloutConfig()), SimpleNamespace(pad_token_id=0),
                          Services(pool=None), SimpleNamespace(rank=0))
    drawn = []
    collector.draw = lambda step, round_, count: drawn.append((step, round_, count)) or ["p3", "p4"]
    collector.generate = lambda records, sampling: [_scored([0.0, 0.0], 3), _scored([1.0, 0.0], 4)]
    exp, timings, metrics = collector.collect(["p1", "p2"], 5, pending=lambda: [_scored([1.0, 1.0], 1),
                                                                               _scored([0.0, 1.0], 2)])
    assert drawn == ([(5, 1, 2)] if rounds > 1 else [])
    assert [int(p) for p in exp.input_ids[::2, 0]] == kept_prompts
    assert exp.scores.tolist() == {3: [0.0, 1.0, 1.0, 0.0], 1: [0.0, 1.0, 1.0, 1.0]}[rounds]
    assert metrics["informative_groups"] == 0.5 and metrics["informative_kept"] == informative_kept
    assert metrics["sampling_rounds"] == min(rounds, 2)


def test_truncated_responses_carry_no_loss_with_mask_truncated():
    from types import SimpleNamespace

    from trainers.rl.collect import Collector, Services

    gens = [_gen([5, 6], [7, 8]), Generation(0, 1, [5, 6], [9, 10, 11], "", [-0.5] * 3, "length")]
    for mask_truncated, expected in ((False, [[1, 1, 0], [1, 1, 1]]), (True, [[1, 1, 0], [0, 0, 0]])):
        algo = AlgoConfig(samples_per_prompt=2, mask_truncated=mask_truncated)
        job = SimpleNamespace(algo=algo, rollout=RolloutConfig())
        collector = Collector(job, SimpleNamespace(pad_token_id=0), Services(pool=None), SimpleNamespace(rank=0))
        exp, _, metrics = collector.collect([SimpleNamespace(prompt_messages=[])], 0, pending=lambda: [gens])
        assert exp.mask.tolist() == expected
        assert metrics["truncated"] == 0.5  # still reported, whichever the setting
