"""chat() / batch_chat(): prompts, image spans, history, left padding, errors (tiny model, tiny tokenizer)."""

import pytest
import torch

from .conftest import tiny_chat_model, tiny_tokenizer

@pytest.fixture
def chat_model():
    return tiny_chat_model()


def _capture(model, monkeypatch):
    seen = {}
    real = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


GEN = dict(max_new_tokens=4, do_sample=False)


def test_text_only_chat_uses_the_template_and_stop_tokens(chat_model, monkeypatch):
    model, tok = chat_model
    seen = _capture(model, monkeypatch)
    answer = model.chat(tok, None, "hello how are you", GEN)
    assert isinstance(answer, str)
    text = tok.decode(seen["input_ids"][0]).replace(" ", "")
    assert text.startswith("<s><|im_start|>system")
    assert "<|im_start|>user" in text and text.rstrip().endswith("assistant")
    assert seen["pixel_values"] is None
    assert tok.convert_tokens_to_ids("<|im_end|>") in seen["eos_token_id"]


def test_image_chat_expands_one_span_per_image(chat_model, monkeypatch):
    model, tok = chat_model
    seen = _capture(model, monkeypatch)
    pixels = torch.randn(3, 3, 56, 56)
    model.chat(tok, pixels, "what is in the image", GEN)
    ids = seen["input_ids"][0]
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((ids == ctx).sum()) == 3 * model.num_image_token
    assert int((ids == tok.convert_tokens_to_ids("<img>")).sum()) == 1


def test_two_images_with_placeholders(chat_model, monkeypatch):
    model, tok = chat_model
    seen = _capture(model, monkeypatch)
    model.chat(tok, torch.randn(3, 3, 56, 56), "<image> a <image> b", GEN, num_patches_list=[1, 2])
    ids = seen["input_ids"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<img>")]
    assert len(starts) == 2
    assert ids[starts[1] - 1] != tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    with pytest.raises(ValueError, match="sums to 2 tiles"):
        model.chat(tok, torch.randn(3, 3, 56, 56), "<image> a <image> b", GEN, num_patches_list=[1, 1])


def test_multi_turn_history_is_rendered_in_order(chat_model, monkeypatch):
    model, tok = chat_model
    pixels = torch.randn(1, 3, 56, 56)
    answer, history = model.chat(tok, pixels, "what is in the image", GEN, return_history=True)
    assert history[0][1] == answer and history[0][0].startswith("<image>\n")
    seen = _capture(model, monkeypatch)
    _, history = model.chat(tok, pixels, "how are you", GEN, history=history, return_history=True)
    assert len(history) == 2
    ids = seen["input_ids"][0]
    assert int((ids == tok.convert_tokens_to_ids("<img>")).sum()) == 1  # the image stays in the first turn
    assert int((ids == tok.convert_tokens_to_ids("<|im_start|>")).sum()) == 5  # system, user, assistant x2


def test_batch_chat_left_padding_matches_single_chats(chat_model):
    model, tok = chat_model
    pixels = torch.randn(3, 3, 56, 56)
    questions = ["what is in the image", "hello", "how are you fine thanks one two three"]
    counts = [2, 0, 1]
    batch = model.batch_chat(tok, pixels, counts, questions, GEN)
    singles = [
        model.chat(tok, pixels[:2], questions[0], GEN),
        model.chat(tok, None, questions[1], GEN),
        model.chat(tok, pixels[2:], questions[2], GEN),
    ]
    assert batch == singles
    with pytest.raises(ValueError, match="image_counts sum to 2"):
        model.batch_chat(tok, pixels, [1, 1, 0], questions, GEN)


def test_prompt_longer_than_the_context_is_an_error(chat_model):
    model, tok = chat_model
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        model.chat(tok, None, "hello " * 300, GEN)


def test_tokenizer_without_special_tokens_is_an_error(chat_model):
    model, _ = chat_model
    with pytest.raises(ValueError, match="load_tokenizer"):
        model.chat(tiny_tokenizer(), None, "hello", GEN)


def test_batch_chat_accepts_num_patches_list_keyword(chat_model):
    model, tok = chat_model
    pixels = torch.randn(2, 3, 56, 56)
    a = model.batch_chat(tok, pixels, [2, 0], ["what is in the image", "hello"], GEN)
    b = model.batch_chat(tok, pixels, questions=["what is in the image", "hello"], generation_config=GEN, num_patches_list=[2, 0])
    assert a == b


def test_placeholder_text_in_an_answer_is_not_an_image(chat_model, monkeypatch):
    model, tok = chat_model
    pixels = torch.randn(1, 3, 56, 56)
    history = [("<image>\nwhat is in the image", "a cat <image> red")]
    seen = _capture(model, monkeypatch)
    model.chat(tok, pixels, "how are you", GEN, history=history)
    assert int((seen["input_ids"][0] == tok.convert_tokens_to_ids("<img>")).sum()) == 1


def test_image_conversation_without_pixels_says_what_to_do(chat_model):
    model, tok = chat_model
    history = [("<image>\nwhat is in the image", "a cat")]
    with pytest.raises(ValueError, match="pass the same pixel_values on every turn"):
        model.chat(tok, None, "how are you", GEN, history=history)


def test_generate_uses_the_checkpoint_generation_config(chat_model):
    model, _ = chat_model
    model.generation_config.max_new_tokens = 3
    ids = torch.randint(9, 20, (1, 5))
    assert model.generate(input_ids=ids, eos_token_id=None).shape == (1, 3)


def test_batch_chat_with_a_tokenizer_without_pad_token(chat_model):
    model, tok = chat_model
    expected = model.batch_chat(tok, None, [0, 0], ["hello", "how are you fine"], GEN)
    tok.pad_token = None
    assert model.batch_chat(tok, None, [0, 0], ["hello", "how are you fine"], GEN) == expected
    assert tok.pad_token is None  # the caller's tokenizer is left as it was
