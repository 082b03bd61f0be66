import pytest

from pipeline.io.instruction_formats import LAYOUTS, detect_layout, normalise
from pipeline.io.rejects import RecordRejected
from pipeline.io.sample_id import conversation_id

U, A, S = "user", "assistant", "system"


def roles(conv):
    return [m["role"] for m in conv.messages]


@pytest.mark.parametrize(
    "record, layout, expected",
    [
        ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca", [(U, "Add\n\n2 and 3"), (A, "5")]),
        ({"instruction": "Add", "input": "", "response": "5", "model": "x"}, "alpaca", [(U, "Add"), (A, "5")]),
        ({"prompt": "p", "completion": "c", "template": "t"}, "prompt_completion", [(U, "p"), (A, "c")]),
        ({"question": "q", "answer": "a"}, "question_answer", [(U, "q"), (A, "a")]),
        ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                            {"from": "gpt", "value": "g"}]}, "sharegpt", [(S, "s"), (U, "h"), (A, "g")]),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                       {"role": "assistant", "content": "yo"}]}, "openai_messages", [(U, "hi"), (A, "yo")]),
        ({"turns": ["one", "two"], "category": "writing"}, "turns", [(U, "one"), (U, "two")]),
        ({"instruction": "Do", "instances": [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}]},
         "task_instances", [(U, "Do\n\na"), (A, "b"), (U, "c"), (A, "d")]),
        ({"dialogs": ["q1", "a1", "q2", "a2"], "annotation": {}}, "xsample", [(U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")]),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
         "hh_rlhf", [(U, "Hi"), (A, "Hello!")]),
        ({"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}]}, "openai_messages", [(S, "Be brief."), (U, "Hi"), (A, "Hello")]),
    ],
)
def test_layouts_normalise_to_canonical_messages(record, layout, expected):
    assert detect_layout(record) == layout
    conv = normalise(record)
    assert conv.layout == layout
    assert [(m["role"], m["content"]) for m in conv.messages] == expected


def test_every_layout_is_covered_by_a_case():
    assert set(LAYOUTS) == {"xsample", "sharegpt", "openai_messages", "task_instances", "alpaca",
                            "prompt_completion", "question_answer", "turns", "hh_rlhf"}


def test_unused_fields_become_metadata():
    conv = normalise({"instruction": "i", "input": "", "response": "r", "model": "davinci", "target": "t"})
    assert conv.metadata == {"model": "davinci", "target": "t"}


def test_xsample_annotations_are_kept():
    rec = {
        "dialogs": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "annotation": {
            "instag": {"content": [{"tag": "math", "explanation": "x"}, "code generation", {"tag": " "}]},
            "deita": {"quality_scores": [4.0, 2.0], "complexity_scores": [1.5, 3.0]},
        },
    }
    conv = normalise(rec)
    assert conv.tags == ["math", "code generation"]
    assert conv.quality_per_round == [4.0, 2.0]
    assert conv.complexity_per_round == [1.5, 3.0]


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"instruction": "x", "input": "", "output": ""}, "empty_content"),
        ({"instruction": "x", "output": 5}, "wrong_type"),
        ({"prompt": "", "completion": "c"}, "empty_content"),
        ({"foo": 1, "bar": 2}, "unknown_layout"),
        ([1, 2, 3], "unknown_layout"),
        ("a string", "unknown_layout"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown_role"),
        ({"conversations": "nope"}, "wrong_type"),
        ({"messages": []}, "empty_content"),
        ({"question": "q", "answer": "a\x00b"}, "invalid_text"),
        ({"dialogs": ["q", "a"], "annotation": {"deita": {"quality_scores": "high"}}}, "wrong_type"),
    ],
)
def test_bad_records_are_rejected_with_a_reason(record, reason):
    with pytest.raises(RecordRejected) as exc:
        normalise(record)
    assert exc.value.reason == reason


def test_forced_layout_and_unknown_layout_name():
    conv = normalise({"question": "q", "answer": "a", "instruction": "i", "output": "o"}, layout="question_answer")
    assert conv.messages[0]["content"] == "q"
    with pytest.raises(ValueError, match="unknown instruction layout"):
        normalise({"question": "q"}, layout="nope")


def test_same_conversation_from_two_layouts_has_one_id():
    a = normalise({"instruction": "Add 2 and 3", "input": "", "output": "5"})
    b = normalise({"conversations": [{"from": "human", "value": "Add 2 and 3 "}, {"from": "gpt", "value": "5"}]})
    c = normalise({"prompt": "Add 2 and 3", "completion": "6"})
    assert conversation_id(a.messages) == conversation_id(b.messages)
    assert conversation_id(a.messages) != conversation_id(c.messages)
