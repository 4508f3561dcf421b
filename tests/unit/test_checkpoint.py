"""final/ writing: atomic, and a classification adapter keeps its label names."""

import json

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from trainers.checkpoint import save_final


def test_classification_adapter_keeps_labels(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("from an earlier save")
    final = save_final(tmp_path, model, tiny_tokenizer)
    assert (final / "adapter_config.json").exists() and not (tmp_path / "final.tmp").exists()
    assert not (final / "stale.txt").exists()
    assert json.loads((final / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
