"""`rayft serve` as a user runs it: one real deployment (Ray Serve LLM + vLLM on CPU) of a
LoRA run over its base plus a second adapter, driven with the official `openai` client
and raw HTTP; the replica is SIGKILLed under load at the end and must come back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.e2e.cli import ROOT, rayft

KEY = "test-key-0123"
PROMPTS = ["1 + 2 =", "The answer is", "Reverse: abc ->", "hello"]
READY_TIMEOUT_S = 240
RECOVERY_TIMEOUT_S = 180


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random, large deltas: clearly different outputs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                      init_lora_weights=False))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("serve")
    make_adapter(tiny_base_dir, ws / "runs" / "lora-run" / "final", seed=1)  # a LoRA run's layout
    make_adapter(tiny_base_dir, ws / "adapter-b", seed=2)
    port = free_port()
    env = {**os.environ, "RAYFT_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", str(ws / "runs" / "lora-run"), "--adapter",
         f"b={ws / 'adapter-b'}", "--model-id", "base", "--port", str(port), "max_model_len=256",
         "kv_cache_gb=0.25", "max_ongoing_requests=4", "max_queued_requests=4", "retry_after_s=2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.time() + READY_TIMEOUT_S
    while not any(line.startswith("ready in") for line in lines):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("rayft serve did not become ready:\n" + "".join(lines[-40:]))
        time.sleep(0.5)
    yield {"url": f"http://127.0.0.1:{port}", "lines": lines, "base": tiny_base_dir, "adapter-b": ws / "adapter-b",
           "pid": proc.pid}
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, "".join(lines[-20:])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body=None, key=KEY, content=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server["url"] + path, json=body, content=content, headers=headers, timeout=timeout)


def greedy(client, model, prompt, n=12):
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]


def test_models_list_the_base_and_both_adapters(client):
    assert sorted(m.id for m in client.models.list().data) == ["base", "base:b", "base:lora-run"]


def test_chat_completion_and_streaming(client):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    chat = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    streamed = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0,
                                              stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == chat.choices[0].message.content
    completion = client.completions.create(model="base:b", prompt="1 + 2 =", max_tokens=6, temperature=0)
    parts = client.completions.create(model="base:b", prompt="1 + 2 =", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in parts) == completion.choices[0].text
    assert completion.usage.completion_tokens <= 6


def test_the_two_adapters_and_the_base_answer_differently(client):
    outputs = {model: [greedy(client, model, p).text for p in PROMPTS] for model in ("base", "base:lora-run", "base:b")}
    assert outputs["base:lora-run"] != outputs["base"]
    assert outputs["base:b"] != outputs["base"]
    assert outputs["base:b"] != outputs["base:lora-run"]


@pytest.mark.parametrize("model,adapter", [("base", None), ("base:b", "adapter-b")])
def test_greedy_tokens_equal_transformers_on_the_same_weights(server, client, model, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(server["base"], dtype=torch.float32)
    if adapter:
        reference = PeftModel.from_pretrained(reference, server[adapter])
    reference.eval()
    for prompt in PROMPTS:
        choice = greedy(client, model, prompt)
        ids = torch.tensor([choice.prompt_token_ids])
        with torch.no_grad():
            for _ in range(len(choice.token_ids)):
                ids = torch.cat([ids, reference(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert ids[0, len(choice.prompt_token_ids):].tolist() == choice.token_ids, prompt


def test_requests_without_the_key_get_401(server):
    for key in (None, "wrong-key"):
        response = httpx.get(server["url"] + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()


CLIENT_ERRORS = {
    "unknown model": ({"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    "unknown adapter": ({"model": "base:nope", "prompt": "x"}, 404, "base:b", "model_not_found"),
    "prompt over the context": ({"model": "base", "prompt": "one two " * 300}, 400, "maximum context length",
                                "context_length_exceeded"),
    "negative temperature": ({"model": "base", "prompt": "x", "temperature": -1}, 400, "temperature", None),
    "max_tokens not a number": ({"model": "base", "prompt": "x", "max_tokens": "lots"}, 400, "max_tokens", None),
}


@pytest.mark.parametrize("case", list(CLIENT_ERRORS))
def test_client_errors_are_4xx_with_an_openai_error_body(server, case):
    body, status, mentions, code = CLIENT_ERRORS[case]
    response = post(server, "/v1/completions", body)
    error = response.json()["error"]
    assert response.status_code == status, error
    assert mentions in error["message"] and error["type"] == "invalid_request_error" and error["code"] == code


def test_malformed_bodies_and_unknown_paths_are_4xx(server, client):
    assert post(server, "/v1/completions", content=b"{not json").status_code == 400
    assert post(server, "/v1/chat/completions", {"model": "base", "messages": "hi"}).json()["error"]["param"] == "messages"
    assert post(server, "/v1/nothing-here", {}).status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], top_p=7)


def test_overload_is_refused_with_503_and_retry_after_not_queued(server):
    """4 in flight + 4 queued per the config: 32 simultaneous long requests overflow it."""
    body = {"model": "base", "prompt": "1 +", "max_tokens": 96, "ignore_eos": True}
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda _: post(server, "/v1/completions", body), range(32)))
    codes = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 503]
    assert set(codes) <= {200, 503} and refused and codes.count(200) >= 8, codes
    assert all(r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "overloaded" for r in refused)
    assert post(server, "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_an_llm_judge_reward_grades_through_the_served_model(server, client, monkeypatch):
    """The llm_judge reward's request is one the served endpoint accepts with the key, and
    its value is parsed from exactly the reply a client gets for the same request."""
    from rollout.judge_reward import llm_judge, parse_grade

    judge = {"url": server["url"] + "/v1", "model": "base", "template": "{response}", "max_tokens": 8,
             "max_score": 1e9}
    monkeypatch.setenv("RAYFT_JUDGE_API_KEY", KEY)
    value, reason = llm_judge("q", "Score: 3 4 5", None, {}, **judge)
    reply = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Score: 3 4 5"}],
                                           temperature=0, max_tokens=8).choices[0].message.content
    grade = parse_grade(reply)
    assert value == (min(max(grade / 1e9, 0.0), 1.0) if grade is not None else 0.0)
    assert repr(" ".join(reply.split()))[:150] in reason
    monkeypatch.setenv("RAYFT_JUDGE_API_KEY", "wrong-key")
    with pytest.raises(RuntimeError, match="refused the request: HTTP 401"):
        llm_judge("q", "x", None, {}, **judge)


def test_health_and_status_report_a_live_engine(server):
    health = httpx.get(server["url"] + "/health", headers={"Authorization": f"Bearer {KEY}"})
    assert health.status_code == 200 and health.json() == {"status": "ok", "engines": {"base": "alive"}}
    address = next(line.split("--address ")[1].strip() for line in server["lines"] if line.startswith("status:"))
    report = json.loads(rayft("serve", "--status", "--json", "--address", address).stdout)["applications"]["rayft"]
    assert report["healthy"] and report["deployments"]["LLMServer:base"]["engine"] == "alive"
    assert report["deployments"]["LLMServer:base"]["replicas"] == {"RUNNING": 1}


def replica_pids(server, name: str) -> list[int]:
    """Serve replica processes of this application (Ray titles them ray::ServeReplica:APP:NAME),
    among the descendants of this test's `rayft serve` only (its embedded Ray cluster)."""
    from tests.integration.faults import own_pids

    return own_pids(f"ServeReplica:rayft:{name}", root=server["pid"])


def test_a_killed_replica_recovers_under_load(server, client):
    """SIGKILL the engine replica while clients keep sending: nothing but 200s and 503s,
    a new replica takes over, and a request sent after the kill succeeds in bounded time."""
    (old_pid,) = replica_pids(server, "LLMServer")
    records, stop = [], threading.Event()  # (sent, done, status) per request

    def load():
        while not stop.is_set():
            sent = time.time()
            try:
                # A request that arrives while the replica restarts waits in Ray Serve's
                # bounded queue until the new one is up: allow it the whole recovery time.
                status = post(server, "/v1/completions", {"model": "base:b", "prompt": "hi", "max_tokens": 8},
                              timeout=RECOVERY_TIMEOUT_S).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            records.append((sent, time.time(), status))
            time.sleep(0.2)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.time()

    def first_success_after_kill():
        done = [end for sent, end, status in records if sent > killed_at + 1 and status == 200]
        return min(done) - killed_at if done else None

    try:
        while first_success_after_kill() is None and time.time() - killed_at < RECOVERY_TIMEOUT_S:
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = {status for _, _, status in records}
    assert first_success_after_kill() is not None, f"no success within {RECOVERY_TIMEOUT_S}s: {records[-10:]}"
    assert statuses <= {200, 503}, statuses
    new_pids = replica_pids(server, "LLMServer")
    assert len(new_pids) == 1 and new_pids != [old_pid]
    assert greedy(client, "base:lora-run", PROMPTS[0]).text  # adapters load on the new replica
