"""Tests for mono.templates: exact prompt strings, registry, image placeholder expansion."""

import dataclasses

import pytest

from mono.templates import (
    IMG_CONTEXT_TOKEN,
    TEMPLATES,
    ChatTemplate,
    expand_image_placeholders,
    get_template,
    image_span,
    register_template,
)

INTERNVL_SYS = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
TWO_TURNS = [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]


def test_internlm2_chat_two_turns_exact():
    expected = (
        f"<|im_start|>system\n{INTERNVL_SYS}<|im_end|>"
        "<|im_start|>user\nQ1<|im_end|>"
        "<|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert get_template("internlm2-chat").render(TWO_TURNS) == expected
    # LMDeploy's name renders the same text.
    assert get_template("internvl2-internlm2").render(TWO_TURNS) == expected


def test_internlm2_chat_stop_tokens_and_no_generation_prompt():
    template = get_template("internlm2-chat")
    assert template.stop_tokens == ("</s>", "<|im_end|>", "<|im_start|>")
    text = template.render([("user", "Q"), ("assistant", "A")], add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\nA<|im_end|>")


def test_chatml_exact():
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    template = get_template("chatml")
    assert template.render([("user", "What is this?")]) == expected
    assert template.stop_tokens == ("<|im_end|>", "<|endoftext|>")


def test_system_message_is_configurable():
    template = get_template("internlm2-chat")
    text = template.render([("user", "Hi")], system_message="Be brief. {not a field}")
    assert text.startswith("<|im_start|>system\nBe brief. {not a field}<|im_end|><|im_start|>user\nHi")
    # An explicit empty string still emits the (empty) system block, as the release does.
    assert template.render([("user", "Hi")], system_message="").startswith("<|im_start|>system\n<|im_end|>")
    custom = get_template("internlm2-chat", system_message="Custom.")
    assert custom.system_message == "Custom."
    assert custom.render([("user", "Hi")]).startswith("<|im_start|>system\nCustom.<|im_end|>")
    # The registered template keeps its default.
    assert TEMPLATES["internlm2-chat"].system_message == INTERNVL_SYS


def test_unknown_template_lists_known_names():
    with pytest.raises(ValueError, match="internlm2-chat") as info:
        get_template("vicuna")
    assert "chatml" in str(info.value) and "vicuna" in str(info.value)


@pytest.mark.parametrize(
    "messages, index",
    [
        ([("assistant", "A")], 0),
        ([("user", "Q"), ("user", "Q2")], 1),
        ([("user", "Q"), ("assistant", "A"), ("assistant", "A2")], 2),
        ([("user", "Q"), ("system", "S")], 1),
    ],
)
def test_role_alternation_errors_name_the_index(messages, index):
    with pytest.raises(ValueError, match=f"message {index}"):
        get_template("internlm2-chat").render(messages, add_generation_prompt=False)


def test_render_rejects_empty_and_generation_after_assistant():
    template = get_template("chatml")
    with pytest.raises(ValueError, match="empty"):
        template.render([])
    with pytest.raises(ValueError, match="add_generation_prompt"):
        template.render([("user", "Q"), ("assistant", "A")], add_generation_prompt=True)


def test_register_template_duplicate_and_override():
    template = dataclasses.replace(get_template("chatml"), name="test-only-template")
    try:
        register_template(template)
        with pytest.raises(ValueError, match="already registered"):
            register_template(template)
        changed = dataclasses.replace(template, system_message="other")
        register_template(changed, override=True)
        assert get_template("test-only-template").system_message == "other"
    finally:
        TEMPLATES.pop("test-only-template", None)


def test_template_requires_system_field():
    with pytest.raises(ValueError, match="system_message"):
        ChatTemplate("bad", "no field here", "", "u", "a", "</s>")


def test_image_span():
    span = image_span(num_tiles=3, num_image_token=4)
    assert span == "<img>" + IMG_CONTEXT_TOKEN * 12 + "</img>"
    with pytest.raises(ValueError, match="num_tiles"):
        image_span(0, 256)


def test_expand_without_placeholder_prefixes_one_per_image():
    assert expand_image_placeholders("Describe.", [2], 1) == "<img>" + IMG_CONTEXT_TOKEN * 2 + "</img>\nDescribe."
    two = expand_image_placeholders("Compare.", [1, 3], 2)
    assert two == (
        "<img>" + IMG_CONTEXT_TOKEN * 2 + "</img>\n<img>" + IMG_CONTEXT_TOKEN * 6 + "</img>\nCompare."
    )
    # No images, no placeholders: text unchanged.
    assert expand_image_placeholders("Just text.", [], 256) == "Just text."


def test_expand_two_placeholders_in_order():
    text = "Image-1: <image>\nImage-2: <image>\nWhat differs?"
    out = expand_image_placeholders(text, [1, 2], 3)
    first, second = "<img>" + IMG_CONTEXT_TOKEN * 3 + "</img>", "<img>" + IMG_CONTEXT_TOKEN * 6 + "</img>"
    assert out == f"Image-1: {first}\nImage-2: {second}\nWhat differs?"


@pytest.mark.parametrize("text, patches", [("<image> and <image>", [1]), ("<image>", [1, 1]), ("<image>", [])])
def test_expand_count_mismatch_names_both_counts(text, patches):
    with pytest.raises(ValueError) as info:
        expand_image_placeholders(text, patches, 256)
    message = str(info.value)
    assert f"{text.count('<image>')} '<image>' placeholder" in message and f"{len(patches)} image" in message


def test_expand_inside_rendered_prompt():
    # The usual flow: render, then expand; the first user turn's placeholder becomes the image span.
    prompt = get_template("internlm2-chat").render([("user", "<image>\nWhat is it?")], system_message="S")
    out = expand_image_placeholders(prompt, [2], 4)
    assert out == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\n<img>"
        + IMG_CONTEXT_TOKEN * 8
        + "</img>\nWhat is it?<|im_end|><|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", ["internlm2-chat", "chatml"])
@pytest.mark.parametrize("system_message", [None, 'Braces {x} {{y}}, quotes "a" \'b\', 中文\nnew line'])
def test_to_jinja_renders_like_render(name, system_message):
    """The Hugging Face chat template written into exported folders renders exactly what ``render`` does."""
    from .conftest import tiny_tokenizer

    template = get_template(name, system_message)
    tok = tiny_tokenizer()
    tok.chat_template = template.to_jinja()
    turns = [("user", "<image>\nwhat {{x}} is it"), ("assistant", "a cat"), ("user", "and now")]
    messages = [{"role": role, "content": text} for role, text in turns]
    for upto, generation in ((1, True), (2, False), (3, True)):
        got = tok.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation)
        assert got == template.render(turns[:upto], add_generation_prompt=generation)
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    assert tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == template.render(
        turns, system_message="Be brief.")
    for bad in ([messages[1]], [messages[0], messages[0]]):
        with pytest.raises(Exception, match="roles must alternate"):
            tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(Exception, match="must be text"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
