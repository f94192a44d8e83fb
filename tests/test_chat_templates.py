"""Chat templates of every family (`mm15.base.families`) through the processor: the system prompt
survives (folded into the first user turn where the template has no system role), labels cover exactly
the replies and their closing text, for prefix-stable templates and the others (Qwen3, Phi-3)."""

from __future__ import annotations

import pytest

from mm15.base.data.chat import ChatTemplate
from mm15.base.data.processor import MM15Processor, PreprocessSpec
from mm15.base.data.sample import Sample, SampleError, Turn
from mm15.base.families import FAMILIES
from mm15.base.model import ModelSpec, load_tokenizer

SYSTEM = "Answer with one colour."


def processor(family: str, **spec) -> MM15Processor:
    tok = load_tokenizer(ModelSpec(tokenizer=f"tiny:{family}"))
    return MM15Processor(tok, PreprocessSpec(system_prompt=SYSTEM, **spec), tokens_per_crop=4)


def texts(p: MM15Processor, sample: Sample, generate: bool = False) -> tuple[str, str]:
    item = p(sample, generate=generate)
    ids, labels = item["input_ids"], item["labels"]
    return p.tokenizer.decode(ids), p.tokenizer.decode(ids[labels != -100])


def chat(*replies: str) -> Sample:
    turns = []
    for k, reply in enumerate(replies):
        turns += [Turn("user", f"Question {k}?"), Turn("assistant", reply)]
    return Sample("s", turns, [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_keeps_the_system_prompt_and_labels_only_the_replies(family):
    p = processor(family, chat_template_kwargs={"enable_thinking": False})
    text, labelled = texts(p, chat("red", "blue"))
    prompt, _ = texts(p, chat("red"), generate=True)
    assert text.count(SYSTEM) == 1 and prompt.count(SYSTEM) == 1
    assert "Question" not in labelled and SYSTEM not in labelled
    assert labelled.index("red") < labelled.index("blue")
    single, single_labels = texts(p, chat("red"))
    assert single.startswith(prompt) and single[len(prompt):] == single_labels  # generation continues the prompt
    assert p.tokenizer.eos_token in single_labels or family == "phi3" and "<|end|>" in single_labels


def test_a_template_without_a_system_role_gets_it_in_the_first_user_turn():
    for family, header in (("gemma2", "<start_of_turn>user\n"), ("mistral", "[INST] ")):
        p = processor(family)
        assert not p.chat.system_role
        text, _ = texts(p, chat("red", "blue"))
        assert header + SYSTEM + "\n\nQuestion 0?" in text
    assert processor("gemma3").chat.system_role  # Gemma 3 folds it itself
    assert processor("llama3").chat.system_role


def test_qwen3_labels_the_thinking_block_only_when_the_prompt_does_not_hold_it():
    thinking = processor("qwen3")
    text, labelled = texts(thinking, chat("red", "blue"))
    assert "<think>\n\n</think>\n\nblue" in text and labelled == "red<|im_end|>\n<think>\n\n</think>\n\nblue<|im_end|>\n"
    plain = processor("qwen3", chat_template_kwargs={"enable_thinking": False})
    assert texts(plain, chat("red", "blue"))[1] == "red<|im_end|>\nblue<|im_end|>\n"
    assert texts(plain, chat("red"), generate=True)[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_phi3_closing_text_is_cut_before_the_next_header_token():
    _, labelled = texts(processor("phi3"), chat("red", "blue"))
    assert labelled == "red<|end|>\nblue<|end|>\n<|endoftext|>"  # not "red<|end|>\n<|" of "<|user|>"


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma3", "smollm3"])
def test_markers_give_the_turn_by_turn_labels_on_prefix_stable_templates(family):
    p = processor(family)
    messages = p.build_messages(chat("red", "blue"), [])
    stable = p.chat._turn_by_turn(messages, generate=False)
    marked = p.chat._with_markers(messages, generate=False)
    assert stable is not None
    join = lambda pieces, target: "".join(t for t, is_target in pieces if is_target == target)
    assert join(marked, True) == join(stable, True) and "".join(t for t, _ in marked) == "".join(t for t, _ in stable)


def test_turns_a_template_refuses_become_a_sample_error():
    p = processor("gemma2")
    sample = Sample("twice", [Turn("user", "a"), Turn("user", "b"), Turn("assistant", "c")], [])
    with pytest.raises(SampleError, match="chat template refused these turns .*alternate"):
        p(sample)


def test_the_core_chatml_template_is_untouched():
    tok = load_tokenizer(ModelSpec(tokenizer="tiny"))
    chat_ = ChatTemplate(tok)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert chat_.system_role and chat_.fit(messages) == messages
    assert [t for t, target in chat_.segments(messages, generate=False) if target] == ["a<|im_end|>\n"]
