"""The pipelined-rollout schedule: step t trains on samples of weight version max(0, t - k),
a checkpoint mid-run resumes on the same samples, and stale samples are refused. The
engines here are a queue that serves requests in order at the version synced before them,
as the pool's engines do (tests/integration/test_rl.py runs the real pool)."""

import pytest

from rollout.engine import Generation
from trainers.rl.pipeline import RolloutPipeline


class InOrderEngines:
    """Requests served in the order sent, each at the weights synced before it was sent."""

    def __init__(self):
        self.version, self.served, self.tickets = 0, {}, 0

    def submit(self, records, step):
        self.tickets += 1
        self.served[self.tickets] = [[Generation(0, 0, [1], [2], "", [0.0], "stop", self.version)] for _ in records]
        return self.tickets

    def result(self, ticket):
        return self.served.pop(ticket)


def _run(staleness, steps, start=0, engines=None, pipeline=None, stop_after=None):
    """The version each step trained on; syncs version t + 1 after step t, as the RL loop."""
    engines = engines or InOrderEngines()
    pipeline = pipeline or RolloutPipeline(engines, staleness, steps, lambda step: [step])
    trained = {}
    for step in range(start, steps):
        pipeline.fill(step)
        trained[step] = pipeline.take(step)[0][0].policy_version
        engines.version = step + 1
        if stop_after == step:
            break
    return trained, pipeline, engines


@pytest.mark.parametrize("staleness", [1, 2, 3])
def test_step_t_trains_on_version_t_minus_k(staleness):
    trained, pipeline, _ = _run(staleness, 10)
    assert trained == {t: max(0, t - staleness) for t in range(10)}
    assert not pipeline.tickets and not pipeline.ready  # nothing requested past the last step


def test_a_resumed_run_trains_on_the_samples_of_an_uninterrupted_one(tmp_path):
    uninterrupted, _, _ = _run(2, 9)
    first, pipeline, _ = _run(2, 9, stop_after=4)
    pipeline.save(tmp_path, rank=0)                # the checkpoint after step 5 (steps 5, 6 in flight)
    resumed = RolloutPipeline(InOrderEngines(), 2, 9, lambda step: [step])
    resumed.restore(tmp_path, rank=0)
    engines = InOrderEngines()
    engines.version = 5                            # the resumed run re-syncs its checkpoint's weights
    resumed.collector = engines
    rest, _, _ = _run(2, 9, start=5, engines=engines, pipeline=resumed)
    assert first | rest == uninterrupted


def test_samples_older_than_the_bound_are_refused():
    engines = InOrderEngines()
    pipeline = RolloutPipeline(engines, 1, 10, lambda step: [step])
    pipeline.fill(0)
    pipeline.fill(1)  # no sync after step 0: step 2's request is sent at version 0, too old for step 2
    pipeline.take(0), pipeline.take(1)
    with pytest.raises(RuntimeError, match="step 3 got samples of weight version 0.*max_staleness=1"):
        pipeline.take(2)
