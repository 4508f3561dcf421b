"""The `llm_judge` reward: an OpenAI-compatible chat endpoint (`rayft serve` of a judge
model, or any other server speaking /v1/chat/completions) grades each response; the
grade scaled to [0, 1] is the reward and the judge's reply is its reason.

    rewards:
      - fn: llm_judge
        params: {url: "http://127.0.0.1:8000/v1", model: judge, max_score: 10}

The key is read from the environment variable `api_key_env` names (default
RAYFT_JUDGE_API_KEY), never from the config, which is saved with the run. Every request
has a timeout; a failed one (no connection, a timeout, HTTP 429 or 5xx) is retried
`retries` times with growing pauses, then the reward raises, naming the endpoint: a run
is not trained on grades that never came.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Optional

DEFAULT_TEMPLATE = (
    "Grade the response to the question below from 0 (wrong or useless) to {max_score} (correct and "
    "complete).{reference_line}\n\nQuestion:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Answer with one line: Score: <number>")
SCORE = re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)


def llm_judge(prompt: str, response: str, reference: Optional[str], metadata: dict, url: str = "",
              model: str = "", api_key_env: str = "RAYFT_JUDGE_API_KEY", template: str = DEFAULT_TEMPLATE,
              max_score: float = 10.0, timeout_s: float = 30.0, retries: int = 2,
              max_tokens: int = 64) -> tuple[float, str]:
    """The judge's grade / max_score, clipped to [0, 1], and its reply; 0.0 when the reply
    holds no number."""
    reference_line = f"\nA correct answer is: {reference}" if reference is not None else ""
    text = template.format(prompt=prompt, response=response, reference=reference or "", max_score=f"{max_score:g}",
                           reference_line=reference_line)
    body = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
            "max_tokens": max_tokens}
    reply = ask(url.rstrip("/") + "/chat/completions", body, os.environ.get(api_key_env), timeout_s, retries)
    grade = parse_grade(reply)
    if grade is None:
        return 0.0, f"the judge's reply holds no score: {_short(reply)}"
    return min(max(grade / max_score, 0.0), 1.0), f"judge: {_short(reply)}"


def parse_grade(reply: str) -> Optional[float]:
    """The number after "Score", else the reply's last number, else None."""
    match = SCORE.search(reply)
    if match:
        return float(match.group(1))
    numbers = NUMBER.findall(reply)
    return float(numbers[-1]) if numbers else None


def ask(endpoint: str, body: dict, key: Optional[str], timeout_s: float, retries: int) -> str:
    """The first choice's message text, trying 1 + `retries` times."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode()
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        request = urllib.request.Request(endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                return _message_text(json.loads(answer.read().decode("utf-8")), endpoint)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            if exc.code not in RETRYABLE_STATUS:
                raise RuntimeError(f"the judge at {endpoint} refused the request: HTTP {exc.code}: {detail}") from None
            last = f"HTTP {exc.code}: {detail}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    raise RuntimeError(f"the judge at {endpoint} gave no answer in {retries + 1} tries of {timeout_s:g} s "
                       f"(last: {last})")


def _message_text(payload, endpoint: str) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"the judge at {endpoint} answered without choices[0].message.content: "
                           f"{_short(json.dumps(payload))}") from None
    return content if isinstance(content, str) else ""


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def check_params(params: dict) -> None:
    url, model = params.get("url", ""), params.get("model", "")
    if not (isinstance(url, str) and re.match(r"https?://", url)):
        raise ValueError(f"url must be the endpoint's http(s) base URL, such as http://127.0.0.1:8000/v1; got {url!r}")
    if not (isinstance(model, str) and model):
        raise ValueError("model (the judge's model id on that endpoint) is required")
    for key, low in (("max_score", 0), ("timeout_s", 0)):
        value = params.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low:
            raise ValueError(f"{key} must be a number > {low}, got {value!r}")
    for key in ("retries", "max_tokens"):
        value = params.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "retries" else 1):
            raise ValueError(f"{key} must be an integer >= {0 if key == 'retries' else 1}, got {value!r}")
    try:
        params.get("template", DEFAULT_TEMPLATE).format(prompt="", response="", reference="", max_score="10",
                                                        reference_line="")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(f"template may use {{prompt}}, {{response}}, {{reference}}, {{max_score}} and "
                         f"{{reference_line}} only: {type(exc).__name__}: {exc}") from None


llm_judge.workers = 8  # requests in flight at once: the judge is a server that batches
