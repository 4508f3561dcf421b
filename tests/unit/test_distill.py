"""Offline distillation without Ray: the per-token divergences against trainers.rl_losses
and a hand-computed value, the method's loss and eval metrics against the same reference
on real tiny models, the teacher seeing packed batches as separate samples, and the
driver's teacher checks."""

import math

import pytest
import torch

from cluster.config import load_config
from trainers import rl_losses
from trainers.data.records import IGNORE_INDEX, Example
from trainers.data.packing import join
from trainers.distill import DistillMethod, check_teacher, token_divergence
from trainers.errors import ConfigError
from trainers.losses import token_nll_sum
from trainers.method import Method


def _logits(seed, shape=(3, 5, 11)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)


def test_divergence_of_two_token_distributions_by_hand():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    one = torch.ones(1)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.375, 0.625]  # beta 0.5 mixture
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert token_divergence(student, teacher, one, "forward_kl").item() == pytest.approx(forward, abs=1e-6)
    assert token_divergence(student, teacher, one, "reverse_kl").item() == pytest.approx(reverse, abs=1e-6)
    assert token_divergence(student, teacher, one, "jsd", beta=0.5).item() == pytest.approx(jsd, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_token_divergence_means_match_rl_losses(temperature):
    s, t = _logits(0), _logits(1)
    mean = lambda loss, beta=0.5: rl_losses.masked_mean(  # noqa: E731
        token_divergence(s, t, MASK, loss, beta, temperature), MASK)
    s_t, t_t = s / temperature, t / temperature  # rl_losses applies a temperature to forward KL only
    assert temperature ** 2 * mean("forward_kl") == pytest.approx(
        rl_losses.forward_kl_with_temperature(s, t, MASK, temperature).item(), rel=1e-5)
    assert mean("reverse_kl") == pytest.approx(rl_losses.reverse_kl(s_t, t_t, MASK).item(), rel=1e-5)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert mean("jsd", beta) == pytest.approx(rl_losses.generalized_jsd(s_t, t_t, MASK, beta).item(), rel=1e-5)
    per_token = token_divergence(s, t, MASK, "jsd", 0.3, temperature)
    assert per_token.shape == MASK.shape and (per_token[~MASK] == 0).all() and (per_token[MASK] > 0).all()


def test_token_divergence_refuses_mismatched_vocabularies():
    with pytest.raises(ValueError, match="same tokenizer"):
        token_divergence(_logits(0), _logits(1, (3, 5, 12)), MASK)
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(_logits(0), _logits(1), MASK, "tv")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """Same architecture and tokenizer as the tiny student, other random weights."""
    from trainers.models import build_model

    return build_model("tiny", tmp_path_factory.mktemp("teacher") / "teacher", seed=1)


def _job(tmp_path, student, teacher, *overrides):
    return load_config(None, [f"model.path={student}", "method=distill", f"distill.teacher={teacher}",
                              f"data.train=[{tmp_path / 'unused.jsonl'}]", f"output_dir={tmp_path}", "name=d",
                              *overrides])


def _examples(tokenizer, n=3):
    rng = torch.Generator().manual_seed(7)
    out = []
    for k in range(n):
        prompt = torch.randint(10, 500, (4 + k,), generator=rng).tolist()
        answer = torch.randint(10, 500, (3 + 2 * k,), generator=rng).tolist() + [tokenizer.eos_token_id]
        out.append(Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out


@pytest.mark.parametrize("loss,ce_weight,temperature", [("forward_kl", 0.5, 2.0), ("reverse_kl", 0.0, 1.0),
                                                        ("jsd", 0.3, 1.5)])
def test_loss_mixes_ce_and_scaled_divergence(loss, ce_weight, temperature, tiny_model_dir, tiny_tokenizer,
                                             teacher_dir, tmp_path):
    job = _job(tmp_path, tiny_model_dir, teacher_dir, f"distill.loss={loss}", f"distill.ce_weight={ce_weight}",
               f"distill.temperature={temperature}", "distill.beta=0.4")
    method = DistillMethod(job, tiny_tokenizer, use_gpu=False)
    student = method.build_model()
    batch = method.collate(_examples(tiny_tokenizer))
    summed, count = method.loss(student, batch)

    # Reference: both models run plainly; rl_losses' masked means times the token count.
    labels = batch["labels"]
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t_logits = method.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, n = token_nll_sum(s_logits, labels)
    mask = labels[:, 1:] != IGNORE_INDEX
    s_t, t_t = s_logits[:, :-1] / temperature, t_logits[:, :-1] / temperature
    scaled = {"forward_kl": lambda: rl_losses.forward_kl_with_temperature(s_logits[:, :-1], t_logits[:, :-1], mask,
                                                                          temperature),
              "reverse_kl": lambda: temperature ** 2 * rl_losses.reverse_kl(s_t, t_t, mask),
              "jsd": lambda: temperature ** 2 * rl_losses.generalized_jsd(s_t, t_t, mask, 0.4)}[loss]()
    expected = ce_weight * ce + (1 - ce_weight) * scaled * n
    assert int(count) == int(n) == int(mask.sum())
    assert summed.item() == pytest.approx(expected.item(), rel=1e-4)

    summed.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not any(p.requires_grad for p in method.teacher.parameters()) and not method.teacher.training
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0

    metrics = method.finish_eval(method.eval_sums(student, batch))
    t1 = {"forward_kl": lambda: rl_losses.forward_kl_with_temperature(s_logits[:, :-1], t_logits[:, :-1], mask),
          "reverse_kl": lambda: rl_losses.reverse_kl(s_logits[:, :-1], t_logits[:, :-1], mask),
          "jsd": lambda: rl_losses.generalized_jsd(s_logits[:, :-1], t_logits[:, :-1], mask, 0.4)}[loss]()
    assert metrics["eval_loss"] == pytest.approx((ce / n).item(), rel=1e-5)
    assert metrics["eval_divergence"] == pytest.approx(t1.item(), rel=1e-4) and metrics["eval_divergence"] > 0.01


def test_ce_weight_one_is_sft_and_self_teacher_diverges_by_zero(tiny_model_dir, tiny_tokenizer, tmp_path):
    job = _job(tmp_path, tiny_model_dir, tiny_model_dir, "distill.ce_weight=1.0")
    method = DistillMethod(job, tiny_tokenizer, use_gpu=False)
    student = method.build_model().eval()
    batch = method.collate(_examples(tiny_tokenizer))
    sft = Method(job, tiny_tokenizer, use_gpu=False)
    assert torch.equal(method.loss(student, batch)[0], sft.loss(student, batch)[0])
    assert method.finish_eval(method.eval_sums(student, batch))["eval_divergence"] == pytest.approx(0.0, abs=1e-6)


def test_teacher_sees_packed_samples_apart(tiny_model_dir, tiny_tokenizer, teacher_dir, tmp_path):
    """A packed row's teacher logits are those of its samples run one by one, also when the
    student's precision (the packed mask's dtype) is not the teacher's."""
    job = _job(tmp_path, tiny_model_dir, teacher_dir, "model.dtype=bfloat16", "distill.teacher_dtype=float32")
    method = DistillMethod(job, tiny_tokenizer, use_gpu=False)
    method.build_model()
    parts = _examples(tiny_tokenizer, 2)
    packed = method.teacher_logits(method.collate([join(parts), parts[0]]))[0]
    start = 0
    for part in parts:
        alone = method.teacher_logits(method.collate([part]))[0]
        torch.testing.assert_close(packed[start:start + len(part.input_ids)], alone, atol=1e-5, rtol=1e-4)
        start += len(part.input_ids)


def _save_llama(path, vocab_size=None, head="causal"):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=vocab_size or 1024)
    model = LlamaForCausalLM(config) if head == "causal" else LlamaForSequenceClassification(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_check_teacher_accepts_a_matching_teacher(tiny_model_dir, tiny_tokenizer, teacher_dir, tmp_path):
    check_teacher(_job(tmp_path, tiny_model_dir, teacher_dir), tiny_tokenizer)


def test_check_teacher_names_the_problem(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoConfig

    student_vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    cases = {
        "missing": (tmp_path / "nowhere", "model directory not found"),
        "vocab": (_save_llama(tmp_path / "vocab", vocab_size=student_vocab + 64),
                  f"vocabulary of {student_vocab + 64} tokens, the student .* {student_vocab}"),
        "head": (_save_llama(tmp_path / "head", student_vocab, head="classifier"), "is not a causal LM"),
    }
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    cases["adapter"] = (adapter, "is a PEFT adapter")
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "pytorch_model.bin").write_bytes(b"")
    cases["pickle"] = (pickle, "no \\*.safetensors")
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    cases["run"] = (run, "is a run directory; the trained model is .*final")
    for name, (teacher, message) in cases.items():
        with pytest.raises(ConfigError, match="distill.teacher") as caught:
            check_teacher(_job(tmp_path, tiny_model_dir, teacher), tiny_tokenizer)
        assert caught.match(message), name


def test_check_teacher_refuses_another_tokenizer(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Same vocabulary size, different token ids: a teacher built on another corpus."""
    from trainers.models import build_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"zebra quokka {i} axolotl narwhal" for i in range(300)))
    teacher = build_model("tiny", tmp_path / "other", corpus_files=[str(corpus)])
    with pytest.raises(ConfigError, match="different tokenizer"):
        check_teacher(_job(tmp_path, tiny_model_dir, teacher), tiny_tokenizer)
