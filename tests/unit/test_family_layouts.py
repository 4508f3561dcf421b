"""Model families and chat templates without Ray: every family `rayft init-model --arch`
builds loads back through transformers with its template; each named template ends an
assistant turn with one special token and renders appended turns as a continuation;
weights leave a trainer in the layout the checkpoint has (MoE experts split per expert,
tied copies dropped); `data.chat_template` names are checked with the key named."""

import json

import pytest
import torch
from safetensors import safe_open

from trainers.chat_templates import TEMPLATES, resolve
from trainers.errors import ConfigError
from trainers.families import FAMILIES
from trainers.models import build_model, load_causal_lm, load_tokenizer
from trainers.transformers_compat import checkpoint_state

TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "tool", "content": "{\"value\": 5}"},
        {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, build_model("tiny", tmp_path_factory.mktemp("families") / request.param, arch=request.param)


def test_a_family_loads_back_with_its_template_and_stop_token(family_dir):
    arch, path = family_dir
    tokenizer, model = load_tokenizer(path), load_causal_lm(path)
    template = FAMILIES[arch].template
    assert tokenizer.chat_template == template.jinja
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == template.end_of_turn
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(TALK, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(template.end_of_turn, add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in template.special_tokens)
    assert tokenizer.decode(ids) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


def test_a_trainers_weights_go_out_as_the_checkpoint_has_them(family_dir):
    arch, path = family_dir
    model = load_causal_lm(path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        on_disk = {name: f.get_tensor(name) for name in f.keys()}
    out = checkpoint_state(model, model.state_dict())
    assert set(out) == set(on_disk)
    assert all(torch.equal(out[name], on_disk[name]) for name in on_disk)
    if arch == "qwen3_moe":  # fused in memory, per expert on disk
        assert any(".experts.gate_up_proj" in name for name in model.state_dict())
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in out
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" in model.state_dict() and "lm_head.weight" not in out


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_template_appends_turns_without_rewriting_earlier_ones(name, tiny_tokenizer):
    jinja = TEMPLATES[name].jinja
    render = lambda messages, prompt: tiny_tokenizer.apply_chat_template(  # noqa: E731
        messages, tokenize=False, chat_template=jinja, add_generation_prompt=prompt)
    for i in range(1, len(TALK)):
        if TALK[i]["role"] == "assistant":
            opened, closed = render(TALK[:i], True), render(TALK[: i + 1], False)
            assert closed.startswith(opened + TALK[i]["content"] + TEMPLATES[name].end_of_turn), name
        assert render(TALK[: i + 1], False).startswith(render(TALK[:i], False)), (name, i)


def test_named_templates_are_checked_against_the_tokenizer(tiny_tokenizer):
    assert resolve(None) is None
    assert resolve("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    assert resolve("chatml", tiny_tokenizer) == TEMPLATES["chatml"].jinja
    with pytest.raises(ConfigError, match="data.chat_template.*unknown chat template 'chatgpt'"):
        resolve("chatgpt")
    with pytest.raises(ConfigError, match="data.chat_template.*<start_of_turn>"):
        resolve("gemma", tiny_tokenizer)  # the tiny Llama's tokenizer is ChatML's


def test_a_named_template_reaches_the_tokenizer_a_run_loads(tmp_path):
    path = build_model("tiny", tmp_path / "qwen2", arch="qwen2")  # ChatML tokens: chatml and qwen both fit
    assert load_tokenizer(path, chat_template="chatml").chat_template == TEMPLATES["chatml"].jinja
    with pytest.raises(ConfigError, match="data.chat_template"):
        load_tokenizer(path, chat_template="llama3")


def test_a_named_template_renders_the_same_tokens_for_training_rollout_and_a_saved_model(tmp_path):
    """Training encodes the conversation, an RL run renders the prompt with the run's tokenizer
    (`rollout.inputs.prompt_ids`, as the Collector does), and the final model directory keeps
    the template for `rayft serve`: all three agree token for token."""
    from transformers import AutoTokenizer

    from rollout.inputs import prompt_ids
    from trainers.data.records import Conversation
    from trainers.data.render import encode, encode_prompt

    path = build_model("tiny", tmp_path / "qwen3", arch="qwen3")
    run_tokenizer = load_tokenizer(path, chat_template="chatml")  # the family's own is qwen
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    trained = encode(Conversation(messages + [{"role": "assistant", "content": "5"}]), run_tokenizer, 64,
                     chat_template="chatml")
    rollout = prompt_ids(run_tokenizer, messages)
    assert rollout == encode_prompt(messages, run_tokenizer, "chatml") == trained.input_ids[:len(rollout)]
    assert trained.labels[len(rollout) - 1] == -100 and trained.labels[len(rollout)] != -100
    run_tokenizer.save_pretrained(tmp_path / "final")
    served = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert prompt_ids(served, messages) == rollout
    assert prompt_ids(load_tokenizer(path), messages) != rollout  # the override did change the rendering
