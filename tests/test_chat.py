"""Chat templates: the models' own templates, the built-in fallbacks, and errors."""

import pytest
from conftest import reference

from ember.errors import ChatTemplateError
from ember.formats.chat import ChatFormat

MESSAGES = [{"role": "user", "content": "Give me three short tips for writing readable Python code."}]


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_model_template_equals_reference_prompt(catalog_model, name):
    m = catalog_model(name)
    ref = reference(name)
    chat_prompt = next(p for p in ref["prompts"] if p["name"] == "chat")
    assert m.render_chat(ref["chat_messages"]) == chat_prompt["text"]
    assert m.chat_ids(ref["chat_messages"]) == chat_prompt["prompt_token_ids"]


def test_gemma_without_template_uses_its_turn_format(catalog_model):
    m = catalog_model("gemma3-270m")
    assert m.chat_format.builtin
    text = m.render_chat(MESSAGES)
    assert text == "<bos><start_of_turn>user\n" + MESSAGES[0]["content"] + "<end_of_turn>\n<start_of_turn>model\n"
    ids = m.chat_ids(MESSAGES)
    assert ids.count(m.tokenizer.bos_id) == 1 and ids[0] == m.tokenizer.bos_id
    assert m.tokenizer.token_to_id("<start_of_turn>") in ids


def test_fallbacks():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    chatml = ChatFormat(None, vocab_has_chatml=True).render(msgs)
    assert chatml == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    plain = ChatFormat(None).render(msgs)
    assert plain == "System: Be brief.\n\nUser: hi\n\nAssistant:"
    gemma = ChatFormat(None, architecture="gemma3", bos_token="<bos>").render(msgs, add_generation_prompt=False)
    assert gemma == "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n"


def test_template_variables_and_tojson():
    t = ChatFormat(
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert t.render([{"role": "user", "content": "é"}]) == '<s>{"role": "user", "content": "é"}</s>'


def test_template_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatFormat("{% for m in messages %}").render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="refused the messages: no system"):
        ChatFormat("{{ raise_exception('no system') }}").render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatFormat("{{ messages[5]['content'].upper() }}").render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatFormat("{{ 1 / 0 }}").render(MESSAGES)


def test_sandbox_blocks_unsafe_access():
    with pytest.raises(ChatTemplateError):
        ChatFormat("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(MESSAGES)


@pytest.mark.parametrize(
    "bad", ["hello", [], [{"role": "user"}], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}]]
)
def test_bad_messages(bad):
    with pytest.raises(ChatTemplateError):
        ChatFormat(None).render(bad)
