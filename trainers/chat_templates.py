"""Named chat templates: `data.chat_template: NAME` for a model whose tokenizer has none
(or a wrong one), and the template `rayft init-model --arch` gives each family.

A template is the Jinja text plus the special tokens it is written in and the token that
ends an assistant turn (generation stops there). Each follows its family's published
layout: the same turn markers, where the system message goes, how tool calls and tool
results are written (Hermes `<tool_call>` JSON in an assistant turn, results in a tool or
user turn). Every template renders an appended turn as a continuation of what came before
(nothing earlier is rewritten), so training, rollout episodes and serving see the same
tokens for the same conversation.

`data.chat_template` also takes literal Jinja (anything with `{%` or `{{`); `resolve`
is the one place that tells the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.errors import ConfigError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    special_tokens: tuple[str, ...]  # tokens the rendering is written in (each one token)
    end_of_turn: str                 # ends an assistant turn; generation stops at it
    bos: str = ""                    # written by the template itself at the start


# Tool schemas into the system turn, Hermes style (Qwen 2.5 / 3 write them the same way).
_TOOLS_SYSTEM = (
    "{%- if tools %}{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call>' }}{%- endif %}"
)

CHATML = ChatTemplate("chatml", (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
), ("<|im_start|>", "<|im_end|>"), "<|im_end|>")

QWEN = ChatTemplate("qwen", (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = 'You are a helpful assistant.' %}"
    "{%- set rest = messages %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}" + _TOOLS_SYSTEM + "{{- '<|im_end|>\\n' }}"
    "{%- for message in rest %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
), ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"), "<|im_end|>")

LLAMA3 = ChatTemplate("llama3", (
    "{{- '<|begin_of_text|>' }}"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}"
    + _TOOLS_SYSTEM + "{{- '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
), ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>",
    bos="<|begin_of_text|>")

# Gemma has no system role: the system text opens the first user turn; assistant is `model`.
GEMMA = ChatTemplate("gemma", (
    "{{- '<bos>' }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- for message in rest %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{%- set text = message['content'] if message['role'] != 'tool' else "
    "'<tool_response>\\n' + message['content'] + '\\n</tool_response>' %}"
    "{{- '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + text + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
), ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", bos="<bos>")

# Mistral's [INST] layout; the system text opens the first instruction.
MISTRAL = ChatTemplate("mistral", (
    "{{- '<s>' }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] + '\\n\\n' %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- for message in rest %}"
    "{%- if message['role'] == 'assistant' %}{{- message['content'] + '</s>' }}"
    "{%- elif message['role'] == 'tool' %}{{- '[TOOL_RESULTS]' + message['content'] + '[/TOOL_RESULTS]' }}"
    "{%- else %}{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- endif %}{%- endfor %}"
), ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "</s>", bos="<s>")

PHI3 = ChatTemplate("phi3", (
    "{%- for message in messages %}"
    "{%- set role = 'user' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|' + role + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
), ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>")

TEMPLATES = {t.name: t for t in (CHATML, QWEN, LLAMA3, GEMMA, MISTRAL, PHI3)}


def is_jinja(value: str) -> bool:
    return "{%" in value or "{{" in value


def resolve(value: str | None, tokenizer=None, key: str = "data.chat_template") -> str | None:
    """The Jinja text `data.chat_template` stands for: a template name, literal Jinja, or
    None (the tokenizer's own). A name whose special tokens the tokenizer does not have as
    single tokens is refused: rendered, they would be split into ordinary pieces and
    generation would never see its stop token."""
    if not value:
        return None
    if is_jinja(value):
        return value
    template = TEMPLATES.get(value)
    if template is None:
        raise ConfigError(key, f"unknown chat template '{value}'; name one of {', '.join(TEMPLATES)} "
                               "or give the Jinja text")
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        missing = [t for t in template.special_tokens if t not in vocab]
        if missing:
            raise ConfigError(key, f"the '{value}' template is written in {', '.join(missing)}, which the "
                                   "model's tokenizer does not have as tokens; pick a template of the model's "
                                   "own family")
    return template.jinja
