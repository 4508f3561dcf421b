"""The `llm_judge` reward's client: grades parsed and scaled, the key sent from the
environment, retries on 5xx with a bound, timeouts, and 4xx refusals, against a small
local HTTP endpoint that answers like /v1/chat/completions (the reward against a real
`rayft serve` is in tests/e2e/test_serve.py)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rollout.judge_reward import llm_judge, parse_grade
from rollout.rewards import RewardError, RewardItem, Rewards, RewardSpec, RewardTerm


class Judge(BaseHTTPRequestHandler):
    """Grades by a word in the response; `failures` 503s come first."""
    log = []
    failures = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.log.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        text = body["messages"][0]["content"]
        if Judge.failures:
            Judge.failures -= 1
            return self.answer(503, {"error": {"message": "busy"}})
        if "Response:\nslow" in text:
            time.sleep(1.5)
        if body["model"] != "judge":
            return self.answer(404, {"error": {"message": f"no model {body['model']}"}})
        grade = {"good": "Score: 9", "bad": "score = 1", "mute": "I cannot grade this.", "huge": "Score: 42"}
        reply = next((g for word, g in grade.items() if f"Response:\n{word}" in text), "Score: 5")
        self.answer(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture(autouse=True)
def fresh_log():
    Judge.log.clear()
    Judge.failures = 0


def test_grades_are_scaled_and_the_reply_is_the_reason(url, monkeypatch):
    monkeypatch.setenv("RAYFT_JUDGE_API_KEY", "judge-key")
    spec = RewardSpec([RewardTerm("llm_judge", params={"url": url, "model": "judge", "max_score": 10})])
    items = [RewardItem("What is 2 + 3?", word, reference="5") for word in ("good", "bad", "mute", "huge")]
    results = Rewards(spec).score(items)
    assert [r.reward for r in results] == pytest.approx([0.9, 0.1, 0.0, 1.0])
    assert results[0].reasons["llm_judge"] == "judge: 'Score: 9'"
    assert results[2].reasons["llm_judge"] == "the judge's reply holds no score: 'I cannot grade this.'"
    assert {entry["auth"] for entry in Judge.log} == {"Bearer judge-key"}
    asked = Judge.log[0]["body"]
    assert asked["temperature"] == 0 and "What is 2 + 3?" in asked["messages"][0]["content"]
    assert "A correct answer is: 5" in asked["messages"][0]["content"]


def test_5xx_is_retried_then_the_grade_arrives(url):
    Judge.failures = 2
    assert llm_judge("q", "good", None, {}, url=url, model="judge", retries=2)[0] == pytest.approx(0.9)
    assert len(Judge.log) == 3


def test_a_judge_that_keeps_failing_raises_after_its_retries(url):
    Judge.failures = 10
    with pytest.raises(RuntimeError, match=r"gave no answer in 2 tries .*HTTP 503"):
        llm_judge("q", "good", None, {}, url=url, model="judge", retries=1)
    assert len(Judge.log) == 2


def test_a_slow_judge_times_out_and_a_refusal_is_not_retried(url):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"gave no answer in 1 tries of 0.3 s"):
        llm_judge("q", "slow", None, {}, url=url, model="judge", timeout_s=0.3, retries=0)
    assert time.monotonic() - started < 1.2
    with pytest.raises(RuntimeError, match=r"refused the request: HTTP 404: .*no model other"):
        llm_judge("q", "good", None, {}, url=url, model="other", retries=3)
    assert len(Judge.log) == 2  # the slow one, and the 404 once


def test_in_a_batch_the_failure_names_the_sample(url):
    Judge.failures = 10
    spec = RewardSpec([RewardTerm("llm_judge", params={"url": url, "model": "judge", "retries": 0})])
    with pytest.raises(RewardError, match=r"reward 'llm_judge' raised on sample 0 .*gave no answer"):
        Rewards(spec).score([RewardItem("q", "good")])


@pytest.mark.parametrize("params, message", [
    ({"model": "judge"}, "url must be"),
    ({"url": "localhost:8000", "model": "judge"}, "url must be"),
    ({"url": "http://x/v1"}, "model .* is required"),
    ({"url": "http://x/v1", "model": "j", "retries": -1}, "retries must be"),
    ({"url": "http://x/v1", "model": "j", "template": "{answer}"}, "template may use"),
])
def test_bad_params_are_refused_at_load(params, message):
    with pytest.raises(RewardError, match=f"reward 'llm_judge': {message}"):
        Rewards(RewardSpec([RewardTerm("llm_judge", params=params)]))


def test_parse_grade():
    assert parse_grade("Reasoning... 3 steps. Score: 7.5") == 7.5
    assert parse_grade("I give it 8") == 8.0
    assert parse_grade("no idea") is None
