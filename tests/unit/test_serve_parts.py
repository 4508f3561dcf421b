"""Serving without a cluster: config checks, what a model or run directory resolves to,
the API key check and the OpenAI-style error bodies."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from cluster.cli import parse_args
from cluster.serve import load_serve_config
from services.auth import ApiKeyMiddleware, key_digest, presented_key
from services.config import ServeConfig, ServeConfigError, is_loopback
from services.errors import clean_message, client_error
from services.models import resolve_served
from trainers.errors import ConfigError


@pytest.fixture(scope="module")
def adapter_factory(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def make(name, r=8, **lora):
        out = tmp_path_factory.mktemp("adapters") / name
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=r, target_modules=["q_proj"], task_type="CAUSAL_LM", **lora))
        model.save_pretrained(out)
        return out

    return make


def serve_args(*argv):
    return parse_args(["serve", *map(str, argv)])


def test_full_model_is_served_under_its_directory_name(tiny_model_dir):
    served = resolve_served(ServeConfig(model=str(tiny_model_dir)))
    assert served.model_id == tiny_model_dir.name and served.adapters == {} and served.max_lora_rank == 0


def test_a_lora_run_is_its_base_plus_the_adapter_named_after_the_run(tiny_model_dir, adapter_factory, tmp_path):
    run = tmp_path / "runs" / "my-lora"
    shutil.copytree(adapter_factory("a", r=12), run / "final")
    other = adapter_factory("b", r=4)
    served = resolve_served(ServeConfig(model=str(run), adapters={"other": str(other)}, model_id="base"))
    assert served.base_dir == str(tiny_model_dir.resolve())
    assert served.adapters == {"my-lora": str(run / "final"), "other": str(other)}
    assert served.model_ids() == ["base", "base:my-lora", "base:other"]
    assert served.max_lora_rank == 16  # rank 12 rounded up to a rank vLLM accepts


@pytest.mark.parametrize("kind,expected", [("dora", "DoRA"), ("other_base", "not on the served base")])
def test_adapters_the_engine_cannot_serve_are_refused_naming_the_key(tiny_model_dir, adapter_factory, tmp_path,
                                                                     kind, expected):
    if kind == "dora":
        adapter = adapter_factory("dora", use_dora=True)
    else:
        adapter = adapter_factory("moved")
        other_base = shutil.copytree(tiny_model_dir, tmp_path / "other-base")
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(other_base)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ServeConfigError, match=expected) as err:
        resolve_served(ServeConfig(model=str(tiny_model_dir), adapters={"x": str(adapter)}))
    assert err.value.key == "adapters.x"


def test_missing_and_non_generative_models_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ServeConfigError, match="not found") as err:
        resolve_served(ServeConfig(model=str(tmp_path / "nope")))
    assert err.value.key == "model"
    classifier = shutil.copytree(tiny_model_dir, tmp_path / "clf")
    config = json.loads((classifier / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (classifier / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServeConfigError, match="causal LM"):
        resolve_served(ServeConfig(model=str(classifier)))
    pickled = shutil.copytree(tiny_model_dir, tmp_path / "pickled")
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ServeConfigError, match="safetensors"):
        resolve_served(ServeConfig(model=str(pickled)))


def test_config_precedence_file_then_flags_then_overrides(tmp_path):
    config_file = tmp_path / "serve.yaml"
    config_file.write_text("model: from-file\nport: 9000\nmax_replicas: 3\nadapters: {a: dir-a}\n")
    cfg = load_serve_config(serve_args("m", "--config", config_file, "--port", 9100, "--adapter", "b=dir-b",
                                       "max_replicas=5", "target_ongoing_requests=4"))
    assert (cfg.model, cfg.port, cfg.max_replicas, cfg.target_ongoing_requests) == ("m", 9100, 5, 4.0)
    assert cfg.adapters == {"a": "dir-a", "b": "dir-b"} and cfg.autoscaling


@pytest.mark.parametrize("argv,key", [
    (["m", "nope=1"], "nope"),
    (["m", "port=eighty"], "port"),
    (["m", "--port", "0"], "port"),
    (["m", "min_replicas=4", "max_replicas=2"], "min_replicas"),
    (["m", "--adapter", "a:b=dir"], "adapters.a:b"),
    (["m", "max_queued_requests=-1"], "max_queued_requests"),
])
def test_bad_settings_name_their_key(argv, key):
    with pytest.raises(ConfigError) as err:
        load_serve_config(serve_args(*argv))
    assert err.value.key == key


def test_deployed_applications_need_a_key(monkeypatch, tiny_model_dir):
    from services.app import app_builder

    monkeypatch.delenv("RAYFT_API_KEY", raising=False)
    with pytest.raises(ServeConfigError, match="API key"):
        app_builder({"model": str(tiny_model_dir)})
    with pytest.raises(ServeConfigError, match="unknown key"):
        app_builder({"model": str(tiny_model_dir), "modle_id": "x"})
    monkeypatch.setenv("RAYFT_API_KEY", "from-env")
    assert ServeConfig(model="m").resolved_api_key() == "from-env"
    assert ServeConfig(model="m", api_key="own").resolved_api_key() == "own"


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")


def call_middleware(digest, headers):
    """Run the key check around an app that answers 200; returns (status, body)."""
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": headers}
    asyncio.run(ApiKeyMiddleware(app, digest)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_the_key_check_accepts_bearer_and_api_key_headers_only_with_the_right_key():
    digest = key_digest("s3cret")
    assert call_middleware(digest, [(b"authorization", b"Bearer s3cret")])[0] == 200
    assert call_middleware(digest, [(b"api-key", b"s3cret")])[0] == 200
    for headers in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", b"s3cret")]):
        status, body = call_middleware(digest, headers)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert call_middleware(None, [])[0] == 200  # no key configured
    assert presented_key([(b"Authorization", b"bearer  abc ")]) == "abc"


def test_engine_error_messages_are_unwrapped_and_name_the_parameter():
    wrapped = ("Message: temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0) "
               "(Request ID: x), Internal exception: ValueError..., original exception: boom")
    assert clean_message(wrapped).startswith("temperature must be non-negative") and "Internal" not in clean_message(wrapped)
    body = json.loads(client_error(400, wrapped).body)["error"]
    assert body == {"message": clean_message(wrapped), "type": "invalid_request_error", "param": "temperature",
                    "code": None}
    too_long = json.loads(client_error(400, "This model's maximum context length is 256 tokens.").body)["error"]
    assert too_long["code"] == "context_length_exceeded"


def test_a_deployment_to_an_existing_cluster_always_gets_a_key(monkeypatch):
    from cluster.serve import ensure_api_key

    monkeypatch.delenv("RAYFT_API_KEY", raising=False)
    local = ServeConfig(model="m", host="127.0.0.1")
    assert ensure_api_key(local, None) == "" and local.api_key == ""  # own proxy on loopback: no key
    for address in ("auto", "ray://head:10001"):
        deployed = ServeConfig(model="m", host="127.0.0.1")
        key = ensure_api_key(deployed, address)
        assert len(key) >= 32 and deployed.api_key == key  # loopback host or not
    exposed = ServeConfig(model="m", host="0.0.0.0")
    assert ensure_api_key(exposed, None) == exposed.api_key != ""
    own = ServeConfig(model="m", api_key="mine")
    assert ensure_api_key(own, "auto") == "" and own.api_key == "mine"  # a given key is kept
    monkeypatch.setenv("RAYFT_API_KEY", "from-env")
    from_env = ServeConfig(model="m")
    assert ensure_api_key(from_env, "auto") == "" and from_env.resolved_api_key() == "from-env"
