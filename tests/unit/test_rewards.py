"""Rewards without Ray: the built-in rules on hand-computed cases, the weighted sum,
rule functions imported by module path and by file path, every error message, and the
reward-model scorer (encoding as the reward trainer does, values as a direct forward
pass, full models and peft SEQ_CLS adapters)."""

import math
import textwrap

import pytest
import torch

from rollout.engine import Generation
from rollout.reward_rules import exact_match, format_check, length_penalty
from rollout.rewards import ModelReward, RewardError, RewardItem, Rewards, RewardSpec, RewardTerm

Q = [{"role": "user", "content": "What is 23 + 45?"}]


def score(*terms, items):
    return Rewards(RewardSpec(list(terms))).score(items)


# -- built-ins -----------------------------------------------------------------------------

def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match("q", "68", "68", {}) == 1.0
    assert exact_match("q", " 68\n", "68 ", {}) == 1.0
    assert exact_match("q", "68.", "68", {}) == 0.0
    assert exact_match("q", "6 8", "68", {}) == 0.0


def test_format_default_is_one_nonempty_line():
    assert format_check("q", "  yes  \n", None, {}) == 1.0
    assert format_check("q", "", None, {}) == 0.0
    assert format_check("q", " \n ", None, {}) == 0.0
    assert format_check("q", "a\nb", None, {}) == 0.0


def test_format_pattern_must_match_the_whole_stripped_response():
    assert format_check("q", " 42\n", None, {}, pattern=r"\d+") == 1.0
    assert format_check("q", "42 apples", None, {}, pattern=r"\d+") == 0.0
    # DOTALL: a pattern can span lines
    assert format_check("q", "<think>a\nb</think>7", None, {}, pattern=r"<think>.*</think>\d+") == 1.0


def test_length_penalty_counts_only_the_excess():
    assert length_penalty("q", "abcdefgh", None, {}, target=5, coef=0.1) == pytest.approx(-0.3)
    assert length_penalty("q", "abc", None, {}, target=5, coef=0.1) == 0.0
    assert length_penalty("q", "one two three four", None, {}, target=1, coef=2.0, unit="words") == -6.0
    assert length_penalty("q", "x", None, {"response_ids": [1] * 10}, target=4, coef=0.5, unit="tokens") == -3.0


def test_builtins_by_short_name_and_rayft_prefix_with_tokens_from_a_generation():
    gen = Generation(prompt_index=0, sample_index=0, prompt_ids=[1, 2], response_ids=[5, 6, 7, 8],
                     text="68", logprobs=[0.0] * 4, finish_reason="stop")
    item = RewardItem.from_generation(Q, gen, reference="68")
    [result] = score(RewardTerm("rayft:exact_match"), RewardTerm("format"),
                     RewardTerm("length_penalty", params={"target": 1, "coef": 0.25, "unit": "tokens"}), items=[item])
    assert result.terms == {"exact_match": 1.0, "format": 1.0, "length_penalty": -0.75}
    assert result.reward == pytest.approx(1.25)


# -- combining -----------------------------------------------------------------------------

def test_weighted_sum_and_per_reward_values():
    terms = [RewardTerm("exact_match", weight=2.0),
             RewardTerm("format", weight=0.5, params={"pattern": r"\d+"}),
             RewardTerm("length_penalty", weight=-1.0, params={"target": 2, "coef": 1.0}, name="too_long"),
             RewardTerm("format", weight=0.0, name="single_line")]
    items = [RewardItem(Q, "68", "68"),                     # 2*1 + 0.5*1 - 1*0     = 2.5
             RewardItem(Q, "68 is it", "68"),               # 2*0 + 0.5*0 - 1*(-6)  = 6.0
             ([{"role": "user", "content": "hi"}], "1234\n5", "5", {})]  # 0 + 0 - 1*(-4) = 4.0
    results = score(*terms, items=items)
    assert [r.reward for r in results] == pytest.approx([2.5, 6.0, 4.0])
    assert results[1].terms == {"exact_match": 0.0, "format": 0.0, "too_long": -6.0, "single_line": 1.0}
    assert results[2].terms["single_line"] == 0.0  # weight 0: logged, not counted


# -- user rule functions ---------------------------------------------------------------------

RULES = textwrap.dedent('''
    import math

    def contains(prompt, response, reference, metadata, bonus=0.0):
        return float(reference in response) + bonus

    def echo(prompt, response, reference, metadata):
        metadata["seen"] = True  # a rule may scribble on its copy
        return len(prompt) + 100 * len(metadata["messages"]) + metadata.get("extra", 0)

    def boom(prompt, response, reference, metadata):
        if response == "bad":
            raise ValueError("boom on purpose")
        return 1.0

    def gives_none(prompt, response, reference, metadata):
        return None

    def gives_text(prompt, response, reference, metadata):
        return "high"

    def gives_nan(prompt, response, reference, metadata):
        return math.nan if response == "bad" else 1.0

    def gives_inf(prompt, response, reference, metadata):
        return math.inf

    def no_metadata(prompt, response, reference):
        return 1.0

    NOT_A_FUNCTION = 3
    ''')


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "my_rules.py"
    path.write_text(RULES)
    return path


def test_rule_by_file_path_with_params(rules_file):
    results = score(RewardTerm(f"{rules_file}:contains", params={"bonus": 0.5}),
                    items=[RewardItem(Q, "it is 68", "68"), RewardItem(Q, "69", "68")])
    assert [r.terms["contains"] for r in results] == [1.5, 0.5]


def test_rule_by_module_path(tmp_path, monkeypatch):
    package = tmp_path / "pkg_for_rewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rules.py").write_text(RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    [result] = score(RewardTerm("pkg_for_rewards.rules:contains", weight=3.0), items=[RewardItem(Q, "68", "68")])
    assert result.reward == 3.0 and result.terms == {"contains": 1.0}


def test_rule_gets_last_user_turn_and_messages_in_a_fresh_metadata_copy(rules_file):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
              {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second!"}]
    item = RewardItem(prompt, "r", None, {"extra": 7})
    rewards = Rewards(RewardSpec([RewardTerm(f"{rules_file}:echo")]))
    assert rewards.score([item])[0].reward == len("second!") + 400 + 7
    assert item.metadata == {"extra": 7}
    assert RewardItem("just text", "r").prompt == [{"role": "user", "content": "just text"}]


LONG = "Please compute the following sum very carefully and show nothing but the answer: 23 + 45"


@pytest.mark.parametrize("fn, message", [
    ("boom", r"reward '.*my_rules.py:boom' raised on sample 1 \(prompt 'Please compute the following .*\.\.\.'\): "
             r"ValueError: boom on purpose"),
    ("gives_none", r"reward '.*:gives_none' returned None \(NoneType\) on sample 0 .*finite number"),
    ("gives_text", r"reward '.*:gives_text' returned 'high' \(str\) on sample 0"),
    ("gives_nan", r"reward '.*:gives_nan' returned nan on sample 1 \(prompt 'Please"),
    ("gives_inf", r"returned inf on sample 0"),
])
def test_a_failing_rule_names_function_sample_and_prompt(rules_file, fn, message):
    items = [RewardItem("short prompt", "good", "x"), RewardItem(LONG, "bad", "x")]
    with pytest.raises(RewardError, match=message) as info:
        score(RewardTerm(f"{rules_file}:{fn}"), items=items)
    assert len(str(info.value)) < 300  # the prompt is shortened, not pasted whole


def test_sample_index_counts_from_start():
    rewards = Rewards(RewardSpec([RewardTerm("exact_match")]))
    with pytest.raises(RewardError, match=r"'exact_match' raised on sample 12 .*needs a reference") as info:
        rewards.score([RewardItem(Q, "68", "68"), RewardItem(Q, "68")], start=11)
    assert info.value.index == 12 and info.value.reward == "exact_match"


@pytest.mark.parametrize("ref, message", [
    ("no_such_module_xyz:score", r"reward 'no_such_module_xyz:score': cannot import module 'no_such_module_xyz'"),
    ("{file}:missing", r"reward '.*my_rules.py:missing': '.*my_rules.py' has no function 'missing'"),
    ("{file}:NOT_A_FUNCTION", r"'.*:NOT_A_FUNCTION' is a int, not a function"),
    ("{file}:no_metadata", r"reward '.*:no_metadata': cannot be called as fn\(prompt, response, reference, metadata"),
    ("nowhere/rules.py:score", r"reward 'nowhere/rules.py:score': file nowhere/rules.py not found"),
    ("exactmatch",
     r"reward 'exactmatch': expected 'module:function'.*built-in \(exact_match, format, length_penalty, overlong_penalty, code_tests, llm_judge\)"),
    ("rayft:exactmatch", r"reward 'rayft:exactmatch': no built-in 'exactmatch'"),
])
def test_a_bad_reference_names_the_reference(rules_file, ref, message):
    with pytest.raises(RewardError, match=message):
        Rewards(RewardSpec([RewardTerm(ref.format(file=rules_file))]))


def test_a_file_that_fails_to_import_names_it(tmp_path):
    bad = tmp_path / "broken_rules.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(RewardError, match=r"reward '.*broken_rules.py:f': cannot import file .*ModuleNotFoundError"):
        Rewards(RewardSpec([RewardTerm(f"{bad}:f")]))


@pytest.mark.parametrize("term, message", [
    (RewardTerm("format", params={"pattern": "(unclosed"}), r"reward 'format': pattern '\(unclosed' is not a valid"),
    (RewardTerm("length_penalty", params={"unit": "bytes"}), r"unit must be chars, words or tokens"),
    (RewardTerm("exact_match", params={"strict": True}), r"reward 'exact_match': cannot be called .*\['strict'\]"),
])
def test_bad_builtin_params_fail_at_load(term, message):
    with pytest.raises(RewardError, match=message):
        Rewards(RewardSpec([term]))


@pytest.mark.parametrize("spec, message", [
    (RewardSpec([]), r"config key 'rewards.rewards': needs at least one reward"),
    (RewardSpec([RewardTerm("")]), r"'rewards.rewards\[0\].fn': is required"),
    (RewardSpec([RewardTerm("format", weight=math.nan)]), r"'rewards.rewards\[0\].weight': must be a finite number"),
    (RewardSpec([RewardTerm("format", params=[1])]), r"'rewards.rewards\[0\].params': must be a mapping"),
    (RewardSpec([RewardTerm("format"), RewardTerm("rayft:format")]),
     r"'rewards.rewards\[1\].name': 'format' is also the name of rewards\[0\]"),
    (RewardSpec([RewardTerm("format")], num_actors=0), r"'rewards.num_actors': must be >= 1"),
])
def test_spec_validation_names_the_key(spec, message):
    with pytest.raises(RewardError, match=message):
        spec.validate()


def test_a_malformed_batch_item_is_named():
    rewards = Rewards(RewardSpec([RewardTerm("format")]))
    with pytest.raises(RewardError, match=r"batch item 1 is not a RewardItem"):
        rewards.score([RewardItem(Q, "a"), (Q, 42)])
    with pytest.raises(RewardError, match=r"batch item 0 is not a RewardItem"):
        rewards.score([(Q, "a", None, {}, "extra")])


def test_absolute_paths_for_files_and_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = RewardSpec([RewardTerm("rules/r.py:f"), RewardTerm("model:runs/rm"), RewardTerm("pkg.mod:f"),
                       RewardTerm("exact_match")]).with_absolute_paths()
    assert [t.fn for t in spec.rewards] == [f"{tmp_path}/rules/r.py:f", f"model:{tmp_path}/runs/rm", "pkg.mod:f",
                                            "exact_match"]


# -- reward models ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """A one-output sequence classifier over the tiny model (random head), saved as `method:
    rm` saves final/: under a run directory."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=1, id2label={0: "reward"}, label2id={"reward": 0})
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    run = tmp_path_factory.mktemp("rm_run")
    model.save_pretrained(run / "final")
    tiny_tokenizer.save_pretrained(run / "final")
    return run


ITEMS = [RewardItem(Q, "68", "68"),
         RewardItem([{"role": "system", "content": "Answer with a number."}, *Q], "It is sixty-eight, I think.", "68"),
         RewardItem("Reverse: abc", "cba")]


def direct_rewards(model, tokenizer, items):
    """One unpadded forward pass per item on the rendered conversation."""
    out = []
    for item in items:
        text = tokenizer.apply_chat_template([*item.prompt, {"role": "assistant", "content": item.response}],
                                             tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def test_model_reward_encodes_like_the_reward_trainer(rm_dir, tiny_tokenizer):
    from trainers.data.pairs import encode_scored
    from trainers.data.records import Scored

    scorer = ModelReward(f"model:{rm_dir}", {})
    for item in ITEMS:
        [expected], _ = encode_scored([Scored(item.prompt, item.response, 0.0)], tiny_tokenizer, 512, "left")
        assert scorer.encode(item) == expected.example.input_ids


def test_model_reward_batched_equals_direct_forward(rm_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir / "final")).eval()
    expected = direct_rewards(model, tiny_tokenizer, ITEMS)
    assert len(set(expected)) == 3
    spec = RewardSpec([RewardTerm(f"model:{rm_dir}", params={"batch_size": 2}), RewardTerm("exact_match", weight=10)])
    # batches of 2 and 1, the first padded (different lengths); a plain tuple is an item too
    results = Rewards(spec).score([ITEMS[0], ITEMS[1], (ITEMS[2].prompt, "cba", "cba", {})])
    assert [r.terms["reward_model"] for r in results] == pytest.approx(expected, abs=1e-5)
    assert [r.reward for r in results] == pytest.approx([expected[0] + 10, expected[1], expected[2] + 10], abs=1e-5)


def test_model_reward_from_a_peft_seq_cls_adapter(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from trainers.checkpoint import save_final

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=1, id2label={0: "reward"}, label2id={"reward": 0})
    base.config.pad_token_id = tiny_tokenizer.pad_token_id
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()
    final = save_final(tmp_path, model, tiny_tokenizer)
    assert (final / "adapter_config.json").is_file()
    expected = direct_rewards(model, tiny_tokenizer, ITEMS)
    got = ModelReward(f"model:{final}", {"batch_size": 3})(ITEMS)
    assert [value for value, _ in got] == pytest.approx(expected, abs=1e-5)
    assert [reason for _, reason in got] == [None] * len(ITEMS)


def test_truncation_keeps_the_end_by_default(rm_dir):
    full = ModelReward(f"model:{rm_dir}", {}).encode(ITEMS[1])
    assert ModelReward(f"model:{rm_dir}", {"max_length": 8}).encode(ITEMS[1]) == full[-8:]
    assert ModelReward(f"model:{rm_dir}", {"max_length": 8, "truncation_side": "right"}).encode(ITEMS[1]) == full[:8]


def test_model_reference_errors(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(RewardError, match=r"reward 'model:/no/such/dir': /no/such/dir is not a directory"):
        ModelReward("model:/no/such/dir", {})
    with pytest.raises(RewardError, match=r"is not a sequence-classification model .*LlamaForCausalLM"):
        ModelReward(f"model:{tiny_model_dir}", {})
    two = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    two.save_pretrained(tmp_path / "cls")
    with pytest.raises(RewardError, match=r"the model has 2 outputs; a reward model has one"):
        ModelReward(f"model:{tmp_path / 'cls'}", {})
    with pytest.raises(RewardError, match=r"unknown params \['temperature'\]"):
        ModelReward(f"model:{tmp_path / 'cls'}", {"temperature": 1.0})
    with pytest.raises(RewardError, match=r"params.batch_size = '8' is not valid"):
        ModelReward(f"model:{tmp_path / 'cls'}", {"batch_size": "8"})


def test_overlong_penalty_is_dapos_soft_punishment():
    from rollout.reward_rules import overlong_penalty

    def score(n):
        return overlong_penalty("q", "x", None, {"response_ids": [7] * n}, max_tokens=32, buffer=8)

    # Up to 32 - 8 = 24 tokens nothing; then (24 - L) / 8 down to -1 at 32.
    assert [score(n) for n in (10, 24, 26, 31, 32, 40)] == pytest.approx([0.0, 0.0, -0.25, -0.875, -1.0, -1.0])
    with pytest.raises(ValueError, match="response_ids"):
        overlong_penalty("q", "x", None, {})
    with pytest.raises(RewardError, match="reward 'overlong_penalty': max_tokens and buffer"):
        Rewards(RewardSpec([RewardTerm("overlong_penalty", params={"max_tokens": 8, "buffer": 16})]))
