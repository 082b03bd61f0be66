"""Instruction-tuning layouts, each normalised to one canonical conversation.

A canonical conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``
messages. Every layout below is detected from the record's keys (or forced by name); a record that
fits none, or that fits one but lacks content, raises :class:`RecordRejected` with a stable reason
code so that the caller can write it to ``rejects/`` instead of dropping it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.io.rejects import RecordRejected

ROLE_ALIASES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for system instructions (o1 and later)
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    layout: str
    metadata: dict[str, Any] = field(default_factory=dict)
    # Annotations carried by the input itself (xsample layout): kept, never recomputed.
    tags: list[str] | None = None
    quality_per_round: list[float] | None = None
    complexity_per_round: list[float] | None = None


def _text(record: dict, key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordRejected("missing_field", f"field '{key}' is missing")
        return ""
    if not isinstance(value, str):
        raise RecordRejected("wrong_type", f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _nonempty(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not messages:
        raise RecordRejected("empty_content", "the conversation has no messages")
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise RecordRejected("empty_content", "the conversation has no non-empty user message")
    return messages


def _user_prompt(instruction: str, input_text: str) -> str:
    instruction, input_text = instruction.strip(), input_text.strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def _role(raw: Any) -> str:
    role = ROLE_ALIASES.get(str(raw).strip().lower()) if raw is not None else None
    if role is None:
        raise RecordRejected("unknown_role", f"unknown speaker role {raw!r}")
    return role


def _content(raw: Any) -> str:
    # OpenAI content may be a list of parts; only text parts make a training conversation.
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        parts = [p.get("text", "") for p in raw if isinstance(p, dict) and p.get("type", "text") == "text"]
        return "\n".join(p for p in parts if isinstance(p, str))
    if raw is None:
        raise RecordRejected("missing_field", "a message has no content")
    raise RecordRejected("wrong_type", f"message content must be text, got {type(raw).__name__}")


def _messages_from_turns(items: Any, role_key: str, content_key: str, field_name: str) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise RecordRejected("wrong_type", f"'{field_name}' must be a list")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise RecordRejected("wrong_type", f"every entry of '{field_name}' must be an object")
        out.append({"role": _role(item.get(role_key)), "content": _content(item.get(content_key))})
    return out


def _rest(record: dict, used: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used}


# ---------------------------------------------------------------- layouts


def _alpaca(r: dict) -> Conversation:
    answer_key = "output" if "output" in r else "response"
    messages = []
    system = r.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _user_prompt(_text(r, "instruction"), _text(r, "input", required=False))})
    answer = _text(r, answer_key)
    if not answer.strip():
        raise RecordRejected("empty_content", f"field '{answer_key}' is empty")
    messages.append({"role": "assistant", "content": answer})
    return Conversation(_nonempty(messages), "alpaca", _rest(r, {"instruction", "input", answer_key, "system"}))


def _task_instances(r: dict) -> Conversation:
    # self-instruct task layout: one instruction, several input/output instances; each instance
    # becomes one user/assistant exchange so that one input row stays one sample.
    instruction = _text(r, "instruction")
    instances = r.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RecordRejected("missing_field", "field 'instances' is missing or empty")
    messages = []
    for k, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise RecordRejected("wrong_type", "every entry of 'instances' must be an object")
        prompt = _user_prompt(instruction, _text(inst, "input", required=False)) if k == 0 else _text(inst, "input", required=False)
        output = _text(inst, "output", required=False)
        if not prompt.strip():
            prompt = instruction
        messages.append({"role": "user", "content": prompt})
        if output.strip():
            messages.append({"role": "assistant", "content": output})
    return Conversation(_nonempty(messages), "task_instances", _rest(r, {"instruction", "instances"}))


def _prompt_completion(r: dict) -> Conversation:
    prompt, completion = _text(r, "prompt"), _text(r, "completion")
    if not completion.strip():
        raise RecordRejected("empty_content", "field 'completion' is empty")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Conversation(_nonempty(messages), "prompt_completion", _rest(r, {"prompt", "completion"}))


def _question_answer(r: dict) -> Conversation:
    question, answer = _text(r, "question"), _text(r, "answer")
    if not answer.strip():
        raise RecordRejected("empty_content", "field 'answer' is empty")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Conversation(_nonempty(messages), "question_answer", _rest(r, {"question", "answer"}))


def _sharegpt(r: dict) -> Conversation:
    messages = _messages_from_turns(r.get("conversations"), "from", "value", "conversations")
    return Conversation(_nonempty(messages), "sharegpt", _rest(r, {"conversations"}))


def _openai_messages(r: dict) -> Conversation:
    messages = _messages_from_turns(r.get("messages"), "role", "content", "messages")
    return Conversation(_nonempty(messages), "openai_messages", _rest(r, {"messages"}))


def _turns(r: dict) -> Conversation:
    # MT-bench style: user turns only (answers are produced later by the model under test).
    turns = r.get("turns")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise RecordRejected("wrong_type", "'turns' must be a list of strings")
    messages = [{"role": "user", "content": t} for t in turns]
    return Conversation(_nonempty(messages), "turns", _rest(r, {"turns"}))


def _scores(value: Any, name: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    raise RecordRejected("wrong_type", f"'{name}' must be a number or a list of numbers")


def _xsample(r: dict) -> Conversation:
    """MIG/xsample annotated layout: ``dialogs`` + ``annotation.instag`` + ``annotation.deita``."""
    dialogs = r.get("dialogs")
    if not isinstance(dialogs, list):
        raise RecordRejected("wrong_type", "'dialogs' must be a list")
    if dialogs and all(isinstance(d, str) for d in dialogs):
        # A flat list of strings alternates user and assistant, starting with the user.
        messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": d} for k, d in enumerate(dialogs)]
    elif dialogs and all(isinstance(d, dict) and "from" in d for d in dialogs):
        messages = _messages_from_turns(dialogs, "from", "value", "dialogs")
    else:
        messages = _messages_from_turns(dialogs, "role", "content", "dialogs")
    annotation = r.get("annotation") or {}
    if not isinstance(annotation, dict):
        raise RecordRejected("wrong_type", "'annotation' must be an object")
    instag = annotation.get("instag") or {}
    raw_tags = instag.get("content") if isinstance(instag, dict) else None
    tags = None
    if raw_tags is not None:
        if not isinstance(raw_tags, list):
            raise RecordRejected("wrong_type", "'annotation.instag.content' must be a list")
        tags = []
        for t in raw_tags:
            tag = t.get("tag") if isinstance(t, dict) else t
            if isinstance(tag, str) and tag.strip():
                tags.append(tag.strip())
    deita = annotation.get("deita") or {}
    quality = _scores(deita.get("quality_scores"), "annotation.deita.quality_scores") if isinstance(deita, dict) else None
    complexity = _scores(deita.get("complexity_scores"), "annotation.deita.complexity_scores") if isinstance(deita, dict) else None
    meta = _rest(r, {"dialogs", "annotation"})
    return Conversation(_nonempty(messages), "xsample", meta, tags, quality, complexity)


# Anthropic HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ..." with the speaker markers at
# the start of the text or after a blank line.
_HH_MARKER = re.compile(r"(?:\A|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# Where the parsed rejected transcript of an HH-RLHF pair is kept in the sample's metadata.
REJECTED_MESSAGES_KEY = "rejected_messages"


def _has_hh_turns(value: Any) -> bool:
    return isinstance(value, str) and _HH_MARKER.search(value) is not None


def parse_hh_transcript(text: str, field_name: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript into canonical messages, or raise RecordRejected.

    Text before the first speaker marker becomes a system message; every "Human:" turn is a user
    message and every "Assistant:" turn an assistant message, their text stripped.
    """
    if not isinstance(text, str):
        raise RecordRejected("wrong_type", f"field '{field_name}' must be a string, got {type(text).__name__}")
    marks = list(_HH_MARKER.finditer(text))
    if not any(m.group(1) == "Human" for m in marks):
        raise RecordRejected("malformed_transcript", f"field '{field_name}' has no '\\n\\nHuman:' turn")
    messages = []
    preamble = text[:marks[0].start()].strip()
    if preamble:
        messages.append({"role": "system", "content": preamble})
    for m, nxt in zip(marks, marks[1:] + [None]):
        body = text[m.end():nxt.start() if nxt is not None else len(text)]
        messages.append({"role": _HH_ROLES[m.group(1)], "content": body.strip()})
    return messages


def _hh_rlhf(r: dict) -> Conversation:
    """Anthropic HH-RLHF: the ``chosen`` transcript is the conversation, the ``rejected`` one is
    kept (parsed) in the metadata for preference data. Also: a bare ``text`` transcript, and the
    prompt + response split ({"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "chosen": " answer",
    "rejected": " answer"}) of the HH derivatives."""
    used = set()
    if "chosen" in r:
        chosen_key, rejected = "chosen", r.get("rejected")
        prompt = r.get("prompt")
        chosen = r["chosen"]
        if isinstance(chosen, str) and not _has_hh_turns(chosen) and _has_hh_turns(prompt):
            # prompt/response split: the answers continue the prompt's last "Assistant:" turn
            chosen = prompt + chosen
            rejected = prompt + rejected if isinstance(rejected, str) else rejected
            used.add("prompt")
        used |= {"chosen", "rejected"}
    else:
        chosen_key, chosen, rejected = "text", r.get("text"), None
        used.add("text")
    messages = parse_hh_transcript(chosen, chosen_key)
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        raise RecordRejected("empty_content", f"the '{chosen_key}' transcript ends with an empty Assistant turn")
    meta = _rest(r, used)
    if rejected is not None:
        try:
            meta[REJECTED_MESSAGES_KEY] = parse_hh_transcript(rejected, "rejected")
        except RecordRejected:
            meta["rejected"] = rejected  # kept as it came, so that nothing is lost
    return Conversation(_nonempty(messages), "hh_rlhf", meta)


# Detection order matters: the most specific layouts first (xsample before OpenAI messages,
# alpaca before prompt/completion because self-instruct predictions carry both sets of keys
# and the alpaca fields are the clean ones).
LAYOUTS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], Conversation]]] = {
    "xsample": (lambda r: "dialogs" in r, _xsample),
    "sharegpt": (lambda r: "conversations" in r, _sharegpt),
    "openai_messages": (lambda r: "messages" in r, _openai_messages),
    "task_instances": (lambda r: "instruction" in r and "instances" in r, _task_instances),
    "alpaca": (lambda r: "instruction" in r and ("output" in r or "response" in r), _alpaca),
    "prompt_completion": (lambda r: "prompt" in r and "completion" in r, _prompt_completion),
    "question_answer": (lambda r: "question" in r and "answer" in r, _question_answer),
    "turns": (lambda r: "turns" in r, _turns),
    "hh_rlhf": (lambda r: ("chosen" in r and (_has_hh_turns(r["chosen"]) or _has_hh_turns(r.get("prompt"))))
                or ("text" in r and _has_hh_turns(r["text"])), _hh_rlhf),
}


def check_layout_name(layout: str) -> None:
    """Raise ValueError (a mistake of the whole job, not of a record) for an unknown layout name."""
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"unknown instruction layout {layout!r}; choose one of: auto, {', '.join(LAYOUTS)}")


def detect_layout(record: Any) -> str:
    if not isinstance(record, dict):
        raise RecordRejected("unknown_layout", f"expected a JSON object, got {type(record).__name__}")
    for name, (matches, _) in LAYOUTS.items():
        if matches(record):
            return name
    keys = ", ".join(sorted(record)[:12])
    raise RecordRejected("unknown_layout", f"no known instruction layout has the keys [{keys}]")


def normalise(record: Any, layout: str = "auto") -> Conversation:
    """Turn one parsed input record into a canonical conversation, or raise RecordRejected."""
    check_layout_name(layout)
    if layout == "auto":
        layout = detect_layout(record)
    elif not isinstance(record, dict):
        raise RecordRejected("unknown_layout", f"expected a JSON object, got {type(record).__name__}")
    conv = LAYOUTS[layout][1](record)
    for m in conv.messages:
        if "\x00" in m["content"]:
            raise RecordRejected("invalid_text", "message content contains NUL characters")
    return conv


def metadata_json(meta: dict[str, Any]) -> str | None:
    if not meta:
        return None
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
