"""Tools a model may call during an episode: Python functions with JSON-schema
signatures, how they are offered in the prompt, how calls are parsed from the
assistant's text, and how a call is run into a tool message.

    calc = Tool(calculator, "Integer arithmetic: a op b.",
                {"a": {"type": "integer"}, "op": {"type": "string", "enum": ["+", "-", "*"]}, "b": {"type": "integer"}})
    calls = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"a": 2, "op": "+", "b": 3}}</tool_call>')
    run_call(calls[0], {"calculator": calc})   # -> {"role": "tool", "name": "calculator", "content": "5"}

The call format is the one Qwen and Hermes chat templates use: a JSON object with
`name` and `arguments` between `<tool_call>` and `</tool_call>`. A chat template that
takes `tools` (its source mentions them) renders the schemas itself; for any other
template the schemas and the format are described in a system message
(`describe_tools`). A malformed call, an unknown tool, bad arguments or a tool that
raises become an `error: ...` tool message, never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}
MAX_RESULT_CHARS = 2000


@dataclass
class Tool:
    fn: Callable[..., Any]
    description: str
    parameters: dict[str, dict]              # argument name -> JSON schema ({"type", "description", "enum"})
    required: Optional[list[str]] = None     # default: every parameter
    name: str = ""                           # default: the function's name

    def __post_init__(self):
        self.name = self.name or self.fn.__name__
        if self.required is None:
            self.required = list(self.parameters)

    @property
    def schema(self) -> dict:
        """The OpenAI / chat-template form: {"type": "function", "function": {...}}."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": self.parameters, "required": self.required}}}

    def check(self, arguments: Any) -> Optional[str]:
        """What is wrong with `arguments` for this tool, or None."""
        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, got {type(arguments).__name__}"
        missing = [name for name in self.required if name not in arguments]
        unknown = [name for name in arguments if name not in self.parameters]
        if missing or unknown:
            return (f"missing {missing} " if missing else "") + (f"unknown {unknown} " if unknown else "") + \
                f"(takes {list(self.parameters)})"
        for name, value in arguments.items():
            expected = JSON_TYPES.get(self.parameters[name].get("type", ""))
            if expected and (not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)):
                return f"argument '{name}' must be of type {self.parameters[name]['type']}"
            allowed = self.parameters[name].get("enum")
            if allowed is not None and value not in allowed:
                return f"argument '{name}' must be one of {allowed}, got {value!r}"
        return None


@dataclass
class ToolCall:
    name: str = ""
    arguments: Any = field(default_factory=dict)
    error: Optional[str] = None              # set when the call could not be parsed


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` in the assistant's text, in order."""
    calls = []
    for body in CALL.findall(text):
        try:
            payload = json.loads(body)
        except ValueError as exc:
            calls.append(ToolCall(error=f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})"))
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            calls.append(ToolCall(error='a tool call is {"name": ..., "arguments": {...}}'))
            continue
        calls.append(ToolCall(payload["name"], payload.get("arguments", {})))
    return calls


def run_call(call: ToolCall, tools: dict[str, Tool]) -> dict:
    """The tool message answering `call`: the result as text, or `error: ...`."""
    def message(content: str) -> dict:
        return {"role": "tool", "name": call.name, "content": content[:MAX_RESULT_CHARS]}

    if call.error:
        return message(f"error: {call.error}")
    tool = tools.get(call.name)
    if tool is None:
        return message(f"error: no tool '{call.name}' (tools: {', '.join(tools)})")
    problem = tool.check(call.arguments)
    if problem:
        return message(f"error: {problem}")
    try:
        result = tool.fn(**call.arguments)
    except Exception as exc:  # noqa: BLE001 (the model's call failed: it is told why)
        return message(f"error: {type(exc).__name__}: {exc}")
    return message(result if isinstance(result, str) else json.dumps(result))


def template_takes_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def describe_tools(tools: list[Tool]) -> str:
    """The system-message text that offers `tools` to a template without tool support."""
    lines = ['You can call these tools: reply with <tool_call>{"name": NAME, "arguments": {...}}</tool_call> '
             "and the result comes in the next message."]
    lines += [f"- {tool.name}({json.dumps(tool.parameters)}): {tool.description}" for tool in tools]
    return "\n".join(lines)


def with_tools(messages: list[dict], tools: list[Tool], tokenizer) -> tuple[list[dict], Optional[list[dict]]]:
    """(messages, tools argument for apply_chat_template): the schemas go to a template
    that takes them, else into the system message."""
    if not tools:
        return messages, None
    if template_takes_tools(tokenizer):
        return messages, [tool.schema for tool in tools]
    text = describe_tools(tools)
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]], None
    return [{"role": "system", "content": text}, *messages], None
