"""LLaMA-Factory `dataset_info.json` sources: an alpaca and a sharegpt entry with their own
column and tag names become the same records as rayft's own rows; a malformed row names
file, line and the entry's own field; a bad entry or an unknown dataset name is a config
error naming its key."""

import json

import pytest

from trainers.config import DataConfig, DataSource
from trainers.data.build import build_datasets
from trainers.errors import ConfigError, DataError

INFO = {
    "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "query": "context", "response": "answer",
                                               "system": "persona"}},
    "talks": {"file_name": "sub/talks.jsonl", "formatting": "sharegpt",
              "columns": {"messages": "dialog", "system": "sys"},
              "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                       "assistant_tag": "agent"}},
}
QA = [{"question": "What is 2 + 3?", "context": "", "answer": "5", "persona": "Be brief."}]
TALK = {"sys": "Helpful.", "dialog": [{"speaker": "customer", "text": "Hi"}, {"speaker": "agent", "text": "Hello!"}]}


@pytest.fixture
def info(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "qa.json").write_text(json.dumps(QA * 4))
    (tmp_path / "sub" / "talks.jsonl").write_text((json.dumps(TALK) + "\n") * 4)
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(INFO))
    return path


def config(info, *names, **kwargs):
    cfg = DataConfig(train=[DataSource(path=n) for n in names], dataset_info=str(info), eval_fraction=0, **kwargs)
    cfg.validate("data")
    return cfg


def rendered(cfg, tokenizer):
    return {tokenizer.decode(e.input_ids) for e in build_datasets(cfg, tokenizer).train}


def test_alpaca_and_sharegpt_entries_render_as_the_same_rows_in_rayft_formats(info, tmp_path, tiny_tokenizer):
    alpaca, chat = tmp_path / "alpaca.jsonl", tmp_path / "chat.jsonl"
    alpaca.write_text(json.dumps({"instruction": "What is 2 + 3?", "input": "", "output": "5",
                                  "system": "Be brief."}) + "\n")
    chat.write_text(json.dumps({"system": "Helpful.", "messages": [{"role": "user", "content": "Hi"},
                                                                   {"role": "assistant", "content": "Hello!"}]}) + "\n")
    ours = DataConfig(train=[DataSource(path=str(alpaca)), DataSource(path=str(chat))], eval_fraction=0)
    expected = rendered(ours, tiny_tokenizer)
    assert len(expected) == 2 and rendered(config(info, "qa", "talks"), tiny_tokenizer) == expected
    stats = build_datasets(config(info, "qa", "talks"), tiny_tokenizer).stats["sources"]
    assert [(s["format"], s["rows"]) for s in stats] == [("alpaca", 4), ("chat", 4)]


def test_a_malformed_row_names_the_entrys_own_field(info, tiny_tokenizer):
    qa = info.parent / "qa.json"
    qa.write_text(json.dumps(QA + [{"question": "What is 1 + 1?", "persona": "x"}]))
    with pytest.raises(DataError, match=r"qa.json:2: field 'answer': is missing"):
        build_datasets(config(info, "qa"), tiny_tokenizer)
    talks = info.parent / "sub" / "talks.jsonl"
    talks.write_text(json.dumps(TALK) + "\n" + json.dumps({"dialog": [{"speaker": "robot", "text": "?"}]}) + "\n")
    with pytest.raises(DataError, match=r"talks.jsonl:2: field 'dialog\[0\].speaker': unknown role 'robot'"):
        build_datasets(config(info, "talks"), tiny_tokenizer)


@pytest.mark.parametrize("entry,key", [
    ({"hf_hub_url": "org/data"}, "data.dataset_info[bad].hf_hub_url"),
    ({"file_name": "x.json", "formatting": "openai"}, "data.dataset_info[bad].formatting"),
    ({"file_name": "x.json", "columns": {"question": "q"}}, "data.dataset_info[bad].columns.question"),
    ({"file_name": "x.json", "formatting": "sharegpt", "tags": {"speaker": "s"}}, "data.dataset_info[bad].tags.speaker"),
    ({"file_name": "x.json", "columns": {"chosen": "good"}}, "data.dataset_info[bad].columns.chosen"),
])
def test_a_bad_entry_is_a_config_error_naming_it(info, entry, key):
    info.write_text(json.dumps({**INFO, "bad": entry}))
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        config(info, "qa")


def test_a_source_that_is_neither_file_nor_dataset_is_named(info):
    with pytest.raises(ConfigError, match=r"data.train\[1\].path.*'qaa' is neither a file nor a dataset.*qa, talks"):
        config(info, "qa", "qaa")


def test_ranking_entries_are_the_preference_pairs_of_rayfts_own_rows(info, tmp_path, tiny_tokenizer):
    """LLaMA-Factory's `ranking: true`: alpaca with chosen / rejected text columns, sharegpt
    with a prompt conversation and chosen / rejected turns; read for dpo, a bad pair names
    the entry's own column."""
    from trainers.data.load import load_records

    entries = {"pairs": {"file_name": "pairs.jsonl", "ranking": True,
                         "columns": {"prompt": "q", "system": "persona", "chosen": "good", "rejected": "bad"}},
               "talk_pairs": {"file_name": "talk_pairs.jsonl", "ranking": True, "formatting": "sharegpt",
                              "columns": {"messages": "dialog"},
                              "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer",
                                       "assistant_tag": "agent"}}}
    info.write_text(json.dumps({**INFO, **entries}))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"q": "What is 2 + 3?", "persona": "Be brief.", "good": "5",
                                                      "bad": "6"}) + "\n")
    (tmp_path / "talk_pairs.jsonl").write_text(json.dumps({
        "dialog": [{"speaker": "customer", "text": "Hi"}, {"speaker": "agent", "text": "Hey"},
                   {"speaker": "customer", "text": "Bye?"}],
        "chosen": {"speaker": "agent", "text": "Goodbye!"}, "rejected": {"speaker": "agent", "text": "No."}}) + "\n")
    ours = tmp_path / "ours.jsonl"
    ours.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "What is 2 + 3?"}], "chosen": "5", "rejected": "6"})
                    + "\n" + json.dumps({"prompt": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hey"},
                                                     {"role": "user", "content": "Bye?"}],
                                          "chosen": "Goodbye!", "rejected": "No."}) + "\n")
    cfg = config(info, "pairs", "talk_pairs")
    def pairs(records):
        return sorted((repr(r.prompt_messages), r.chosen, r.rejected) for r in records)
    got = build_datasets(cfg, tiny_tokenizer, purpose="preference").train
    assert len(got) == 2 and pairs(got) == pairs(load_records(ours, purpose="preference").records)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"q": "What is 2 + 3?", "good": "5"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'bad': is missing"):
        build_datasets(config(info, "pairs"), tiny_tokenizer, purpose="preference")
