"""Shared-prompt rows (trainers.rl.shared_rows): a prompt's samples as one sequence give
each response token the same log-prob, value and gradient as the padded layout, and are
used only when they save tokens and the attention kernel takes a 4D mask."""

import pytest
import torch

from rollout.engine import Generation
from trainers.rl.experience import at_response, build_experience, token_logp
from trainers.rl.model import RLModel
from trainers.rl.shared_rows import Layout, shared_rows


def _gen(prompt, response):
    return Generation(0, 0, list(prompt), list(response), "", [-0.5] * len(response), "stop")


def _groups():
    # Two prompts of different lengths, three and two samples of different lengths
    # (one empty), listed out of group order as a shuffled mini-batch would hold them.
    a, b = [5, 6, 7, 8], [9, 10]
    return [_gen(a, [11, 12, 13]), _gen(b, [14]), _gen(a, [15]), _gen(b, [16, 17, 18, 19]), _gen(a, [])]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from trainers.models import load_causal_lm

    torch.manual_seed(0)
    return RLModel(load_causal_lm(tiny_model_dir), with_value_head=True)


def _outputs(model, exp, layout):
    inputs, at_responses = layout(exp)
    logits, values = model(**inputs)
    logp = token_logp(at_responses(logits), exp.response_ids)
    return logp, at_responses(values)


def test_shared_rows_match_the_padded_layout(model):
    exp = build_experience(_groups(), [1.0, 0.0, 0.5, 0.2, 0.0], pad_id=0)
    rows = shared_rows(exp)
    assert rows is not None and rows.input_ids.shape[0] == 2  # one row per distinct prompt
    assert rows.input_ids.numel() < exp.input_ids.numel()
    model.eval()
    padded_logp, padded_values = _outputs(model, exp, Layout(share=False))
    shared_logp, shared_values = _outputs(model, exp, Layout(share=True))
    mask = exp.mask.bool()
    assert mask.sum() == 9
    torch.testing.assert_close(shared_logp[mask], padded_logp[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_values[mask], padded_values[mask], atol=1e-5, rtol=0)


def test_shared_rows_give_the_same_gradient(model):
    exp = build_experience(_groups(), [1.0, 0.0, 0.5, 0.2, 0.0], pad_id=0)
    weights = torch.linspace(-1, 1, exp.mask.numel()).reshape(exp.mask.shape) * exp.mask
    grads = []
    for share in (False, True):
        model.zero_grad()
        logp, values = _outputs(model, exp, Layout(share=share))
        ((logp * weights).sum() + (values * weights).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_padded_layout_where_nothing_is_shared(model):
    exp = build_experience([_gen([5, 6], [7, 8]), _gen([9], [10])], [0.0, 1.0], pad_id=0)
    assert shared_rows(exp) is None  # every prompt once: no token to save
    inputs, at_responses = Layout(share=True)(exp)
    assert inputs["input_ids"] is exp.input_ids
    logits = torch.randn(*exp.input_ids.shape, 3)
    assert torch.equal(at_responses(logits), at_response(logits, exp))


def test_layout_follows_the_attention_kernel(model):
    policy = model.policy
    assert Layout.for_model(policy, share_prompts=True).share
    assert not Layout.for_model(policy, share_prompts=False).share
    kernel = policy.config._attn_implementation
    try:
        policy.config._attn_implementation = "flash_attention_2"  # no 4D masks
        assert not Layout.for_model(policy, share_prompts=True).share
    finally:
        policy.config._attn_implementation = kernel


def test_long_rows_stay_padded_when_attention_would_cost_more():
    # 8 samples of one 4-token prompt, 60-token responses: 484 tokens shared against 512
    # padded, but one 484-wide row attends over 8x the keys of 64-wide ones.
    gens = [_gen([1, 2, 3, 4], list(range(5, 65))) for _ in range(8)]
    exp = build_experience(gens, [0.0] * 8, pad_id=0)
    assert shared_rows(exp, attention_weight=0.0) is not None
    assert shared_rows(exp, attention_weight=0.01) is None
