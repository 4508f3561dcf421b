"""The teacher actor on a real local Ray cluster, with the tiny model: its rows are the
log-softmax of a plain transformers forward pass on each sample alone, at the positions
that predict the response tokens, whole or as the top k and the rest's mass; padding and batch splits change nothing; the response
tokens' entries are the transformers engine's scores; a bad model directory is reported
with its load error; behind `TeacherService`, a SIGKILLed teacher is restarted and the
request re-issued."""

import os
import signal

import numpy as np
import pytest
import torch

from rollout.hf_engine import HFEngine
from rollout.teacher import TeacherActor, TeacherService, start_teacher, stop_teacher

PROMPTS = [[5, 17, 200, 31], [9], [40, 41, 42, 43, 44, 45, 46, 47, 48], [300, 301]]
RESPONSES = [[12, 13, 14], [77, 78, 79, 80, 81, 82, 83], [500], [600, 601, 602, 603]]


@pytest.fixture(scope="module")
def teacher(ray_cluster, tiny_model_dir):
    actor = start_teacher(str(tiny_model_dir), cpus=1)
    yield actor
    stop_teacher(actor)


def _reference(model_dir, temperature):
    """Each sample alone, unpadded: log_softmax(logits / T) where the response is predicted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for prompt, response in zip(PROMPTS, RESPONSES):
            logits = model(torch.tensor([prompt + response])).logits[0]
            picked = logits[len(prompt) - 1: len(prompt) - 1 + len(response)]
            rows.append(torch.log_softmax(picked / temperature, -1).numpy())
    return rows


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rows_are_the_teachers_distribution_at_each_response_token(teacher, tiny_model_dir, temperature):
    import ray

    vocab = ray.get(teacher.ready.remote())
    rows = ray.get(teacher.logprobs.remote(PROMPTS, RESPONSES, temperature))
    expected = _reference(tiny_model_dir, temperature)
    assert len(rows) == len(PROMPTS)
    for row, ref, response in zip(rows, expected, RESPONSES):
        assert row.dtype == np.float32 and row.shape == (len(response), vocab)
        np.testing.assert_allclose(row, ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.exp(row).sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_k_rows_are_the_largest_entries_and_the_rest_of_the_mass(teacher, temperature):
    import ray

    full = ray.get(teacher.logprobs.remote(PROMPTS, RESPONSES, temperature))
    top = ray.get(teacher.top_logprobs.remote(PROMPTS, RESPONSES, 5, temperature))
    for row, (logp, ids), response in zip(full, top, RESPONSES):
        assert logp.shape == (len(response), 6) and ids.shape == (len(response), 5)
        np.testing.assert_allclose(logp[:, :5], np.sort(row, -1)[:, ::-1][:, :5], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(np.take_along_axis(row, ids, -1), logp[:, :5])
        rest = np.log(np.exp(row).sum(-1) - np.exp(logp[:, :5]).sum(-1))
        np.testing.assert_allclose(logp[:, 5], rest, atol=1e-4, rtol=0)


def test_padding_and_batch_splits_change_nothing(teacher, tiny_model_dir):
    import ray

    batched = ray.get(teacher.logprobs.remote(PROMPTS, RESPONSES))
    for k in range(len(PROMPTS)):
        (alone,) = ray.get(teacher.logprobs.remote([PROMPTS[k]], [RESPONSES[k]]))
        np.testing.assert_allclose(batched[k], alone, atol=1e-5, rtol=0)
    # The class itself, with a token budget that puts about one sample in each forward pass.
    small = TeacherActor(str(tiny_model_dir), max_batch_tokens=12)
    assert len(small._batches([p + r for p, r in zip(PROMPTS, RESPONSES)])) == 4
    for split, whole in zip(small.logprobs(PROMPTS, RESPONSES), batched):
        np.testing.assert_allclose(split, whole, atol=1e-5, rtol=0)


def test_response_entries_are_the_engine_scores(teacher, tiny_model_dir):
    import ray

    rows = ray.get(teacher.logprobs.remote(PROMPTS, RESPONSES))
    scores = HFEngine(str(tiny_model_dir)).score(PROMPTS, RESPONSES)
    for row, response, score in zip(rows, RESPONSES, scores):
        np.testing.assert_allclose(row[np.arange(len(response)), response], score, atol=1e-5, rtol=0)


def test_a_directory_without_safetensors_is_reported(ray_cluster, tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        start_teacher(str(tmp_path), cpus=1)


def test_a_killed_teacher_is_restarted_and_the_request_reissued(ray_cluster, tiny_model_dir):
    import ray

    service = TeacherService(str(tiny_model_dir), cpus=0.5, timeout_s=300, max_retries=1)
    try:
        before = service.logprobs(PROMPTS, RESPONSES)
        (teacher,) = service.actor.handles()
        os.kill(ray.get(teacher.pid.remote(), timeout=60), signal.SIGKILL)  # this actor's own process only
        after = service.logprobs(PROMPTS, RESPONSES)
        assert ray.get(service.actor.owner.generations.remote(), timeout=60) == [1]
        for a, b in zip(after, before):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    finally:
        service.stop()
