"""The preprocessor: labels supervise exactly the answers and their <|im_end|>, prompt ids equal inference's, tiles
follow the caps, augmentation is a function of (seed, epoch, index), and every bad case is a named skip."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from evip.data.preprocess import IGNORE_INDEX, Preprocessor, tokens_per_tile
from evip.data.sources import build_sources
from evip.data.types import ImageRef, RawSample, SkipSample
from evip.job import DataConfig
from mono import MonoInternVL, MonoInternVLConfig
from mono.processing import load_images
from mono.templates import IMAGE_PLACEHOLDER, ChatTemplate, get_template
from mono.tokenization import add_special_tokens
from tests.evip.fixtures import (
    BAD_CASES, make_images, tiny_bpe_tokenizer, tiny_preprocessor, write_conversations, write_pairs_jsonl,
    write_pairs_webdataset,
)

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def pre(tok):
    return tiny_preprocessor(tok)


@pytest.fixture(scope="module")
def convs(tmp_path_factory):
    """One conversation of each style: one image, several images, text only, system + no placeholder + 2 rounds."""
    folder = tmp_path_factory.mktemp("convs")
    data = write_conversations(folder, 4, seed=0)
    (source,) = build_sources([data.dataset_config()], 6)
    return [source.get(i) for i in range(len(source))]


def _runs(ex, tokenizer) -> list[str]:
    """The supervised text, one string per contiguous run of supervised labels."""
    labels = ex.labels_L.tolist()
    supervised = [lab != IGNORE_INDEX for lab in labels]
    assert all(lab == tid for lab, tid, s in zip(labels, ex.input_ids_L.tolist(), supervised) if s)
    runs, current = [], []
    for lab, s in zip(labels, supervised):
        if s:
            current.append(lab)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def _answers(raw) -> list[str]:
    return [raw.caption] if raw.kind == "pair" else [t for r, t in raw.conversation if r == "assistant"]


def _model(tokenizer, image_size=56) -> MonoInternVL:
    config = MonoInternVLConfig(
        vision_config=dict(hidden_size=16, image_size=image_size, patch_size=14),
        llm_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096),
        force_image_size=image_size,
    )
    return MonoInternVL(config)


# ---------------------------------------------------------------------------------------------------- labels
def test_pair_supervises_the_caption_and_its_turn_end(tmp_path, tok, pre):
    (image,) = make_images(tmp_path, 1, seed=1)
    raw = RawSample("p:1", "p", "pair", images=[ImageRef(path=str(image))], caption=image.caption)
    ex = pre(raw)
    assert _runs(ex, tok) == [image.caption + IM_END]
    assert ex.num_visual_tokens == (ex.input_ids_L == pre.img_context_id).sum() == 4 * sum(ex.num_tiles)


def test_conversations_supervise_each_answer_and_its_turn_end(tok, pre, convs):
    styles = set()
    for raw in convs:
        ex = pre(raw)
        assert _runs(ex, tok) == [a + IM_END for a in _answers(raw)], raw.sample_id
        assert ex.num_targets == int((ex.labels_L != IGNORE_INDEX).sum())  # BOS is never supervised
        styles.add((min(len(raw.images), 2), len(_answers(raw)), raw.conversation[0][0]))
    assert styles == {(1, 1, "user"), (2, 1, "user"), (0, 2, "user"), (1, 2, "system")}  # 2: two or more images


def test_pairs_of_every_format_supervise_the_caption(tmp_path, tok, pre):
    for data in (write_pairs_jsonl(tmp_path / "j", 4, seed=2), write_pairs_webdataset(tmp_path / "w", 4, seed=2)):
        (source,) = build_sources([data.dataset_config()], 6)
        for i in range(len(source)):
            raw = source.get(i)
            assert _runs(pre(raw), tok) == [data.samples[raw.sample_id]["caption"] + IM_END]


# ---------------------------------------------------------------------------------------------------- parity
def _chat_turns(raw, pre) -> tuple[list[tuple[str, str]], str | None]:
    """The (question, answer) rounds and system message as a user would pass them to ``MonoInternVL.chat``."""
    if raw.kind == "pair":
        turns = [("user", IMAGE_PLACEHOLDER + "\n" + pre.caption_prompt), ("assistant", raw.caption)]
    else:
        turns = list(raw.conversation)
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    return [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns), 2)], system


def test_prompt_ids_equal_what_chat_tokenizes(tmp_path, tok, pre, convs):
    """For every answer, the ids before it are exactly the ids ``MonoInternVL.chat`` builds for that prompt."""
    model = _model(tok)
    (image,) = make_images(tmp_path, 1, seed=3)
    pair = RawSample("p:1", "p", "pair", images=[ImageRef(path=str(image))], caption="a caption")
    for raw in convs + [pair]:
        ex = pre(raw)
        rounds, system = _chat_turns(raw, pre)
        model.system_message = system
        if raw.images and not any(IMAGE_PLACEHOLDER in q for q, _ in rounds):
            rounds[0] = ((IMAGE_PLACEHOLDER + "\n") * len(raw.images) + rounds[0][0], rounds[0][1])
        ids = ex.input_ids_L.tolist()
        for k in range(len(rounds)):
            prompt = model._render(rounds[:k], rounds[k][0], ex.num_tiles, ("<img>", "</img>", "<IMG_CONTEXT>"))
            expected = tok(prompt)["input_ids"]
            assert ids[: len(expected)] == expected, (raw.sample_id, k)
            # Inside the prompt only the k earlier answers are supervised; answer k starts right after it.
            before = ex.labels_L[: len(expected)] != IGNORE_INDEX
            assert int((before[1:] & ~before[:-1]).sum()) + int(before[0]) == k
            assert not before[-1] and ex.labels_L[len(expected)] != IGNORE_INDEX


def test_inserted_context_ids_equal_tokenizing_the_full_spans(tok, pre, convs):
    for raw in convs:
        ex = pre(raw)
        turns, system = pre.turns(raw)
        text, _, _ = pre.render(turns, system, ex.num_tiles, image_context=True)
        assert ex.input_ids_L.tolist() == tok(text)["input_ids"], raw.sample_id


def test_a_token_across_an_answer_start_is_a_token_mismatch():
    # A byte-level BPE without pre-tokenization merges "\n" with the answer's first letters.
    corpus = ["<|im_start|>assistant\nAnswer<|im_end|>"] * 50
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    model.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>")
    add_special_tokens(tokenizer)
    pre = tiny_preprocessor(tokenizer, system_message="")
    raw = RawSample("c:1", "c", "conversation", conversation=[("user", "Q"), ("assistant", "Answer")])
    with pytest.raises(SkipSample, match="spans the start of an answer") as info:
        pre(raw)
    assert info.value.reason == "token_mismatch" and info.value.sample_id == "c:1"


# ---------------------------------------------------------------------------------------------------- pixels
def test_tiles_follow_the_cap_and_the_multi_image_split(tmp_path, tok):
    pre = tiny_preprocessor(tok, image_size=28, max_seq_len=4096)
    images = make_images(tmp_path, 4, seed=4)
    for max_tiles in (1, 3, 6, 12):
        for n in (1, 2, 3, 4):
            paths = [str(p) for p in images[:n]]
            raw = RawSample("s:1", "s", "conversation", images=[ImageRef(path=p) for p in paths],
                            conversation=[("user", "Look."), ("assistant", "Shapes.")], max_tiles=max_tiles)
            ex = pre(raw)
            budget = max(1, max_tiles // n)
            assert all(t <= budget + (t > 1) for t in ex.num_tiles)  # + the thumbnail of a multi-tile image
            expected, tiles = load_images(paths, 28, 1, max_tiles, use_thumbnail=True)  # what inference loads
            assert ex.num_tiles == tiles and torch.equal(ex.pixel_values_N, expected)
            assert ex.num_visual_tokens == sum(tiles) == (ex.input_ids_L == pre.img_context_id).sum()


def test_text_only_has_no_pixels(tok, pre, convs):
    (raw,) = [r for r in convs if not r.images]
    ex = pre(raw)
    assert ex.pixel_values_N is None and ex.num_tiles == [] and ex.num_visual_tokens == 0


def test_jpeg_reencode_is_a_function_of_seed_epoch_and_index(tmp_path, tok):
    (image,) = make_images(tmp_path, 1, seed=5)
    raw = RawSample("a:1", "a", "pair", images=[ImageRef(path=str(image))], caption="c", augment=True, index=7)

    def pixels(pre, raw, epoch):
        # Global random state must not matter.
        random.seed(epoch * 13 + 1), np.random.seed(epoch + 5), torch.manual_seed(epoch + 9)
        return pre(raw, epoch=epoch).pixel_values_N

    pre, same = tiny_preprocessor(tok, seed=1), tiny_preprocessor(tok, seed=1)
    by_epoch = [pixels(pre, raw, e) for e in range(4)]
    assert all(torch.equal(by_epoch[e], pixels(same, raw, e)) for e in range(4))
    assert len({t.numpy().tobytes() for t in by_epoch}) > 1  # epochs differ
    plain = pre(dataclasses.replace(raw, augment=False)).pixel_values_N
    assert all(not torch.equal(t, plain) for t in by_epoch)  # JPEG at quality <= 100 always changes pixels
    assert not torch.equal(pixels(pre, dataclasses.replace(raw, index=8), 0), by_epoch[0])
    assert not torch.equal(pixels(tiny_preprocessor(tok, seed=2), raw, 0), by_epoch[0])
    assert torch.equal(plain, load_images([str(image)], 56, 1, 6)[0])


# ---------------------------------------------------------------------------------------------------- skips
@pytest.mark.parametrize("writer", [write_pairs_webdataset, write_pairs_jsonl, write_conversations])
def test_each_bad_case_is_a_skip_with_its_reason_and_sample_id(tmp_path, pre, writer):
    data = writer(tmp_path, 6, seed=6, bad=BAD_CASES)
    (source,) = build_sources([data.dataset_config()], 6)
    got, used = {}, 0
    for i in range(len(source)):
        try:
            pre(source.get(i))
            used += 1
        except SkipSample as skip:
            assert skip.sample_id in str(skip)
            got[skip.reason] = skip.sample_id
    assert got == data.bad_ids and used == len(data.samples) == 6


@pytest.mark.parametrize(
    "turns, images, reason, match",
    [
        ([("user", "q"), ("assistant", " ")], 0, "bad_conversation", "empty answer"),
        ([("user", "q"), ("assistant", "a"), ("user", "again?")], 0, "bad_conversation", "without an answer"),
        ([("assistant", "a"), ("user", "q")], 0, "bad_conversation", "turn 0"),
        ([("user", "q"), ("user", "q"), ("assistant", "a")], 0, "bad_conversation", "turn 1"),
        ([("user", "<image><image> q"), ("assistant", "a")], 1, "bad_conversation", "2 <image> placeholder"),
        ([("user", "<image> q"), ("assistant", "a <image>")], 1, "bad_conversation", "an answer"),
        ([("system", "s <image>"), ("user", "q"), ("assistant", "a")], 1, "bad_conversation", "system"),
        ([("user", "<image> q"), ("assistant", "a")], 0, "bad_conversation", "for 0 image"),
        ([("user", "<img> q"), ("assistant", "a")], 1, "truncated_image_span", "2 <img>"),
        ([("user", "q"), ("assistant", "a </img>")], 1, "truncated_image_span", "2 </img>"),
        ([("user", "q"), ("assistant", "a <img>x</img>")], 0, "truncated_image_span", "for 0 image"),
        ([("user", "<IMG_CONTEXT> q"), ("assistant", "a")], 1, "token_mismatch", "IMG_CONTEXT"),
        ([("user", "<img><IMG_CONTEXT></img>"), ("assistant", "a")], 0, "token_mismatch", "IMG_CONTEXT"),
    ],
)
def test_conversation_skips(tmp_path, pre, turns, images, reason, match):
    refs = [ImageRef(path=str(p)) for p in make_images(tmp_path, images, seed=7)]
    raw = RawSample("x.jsonl:3", "x", "conversation", images=refs, conversation=turns)
    with pytest.raises(SkipSample, match=match) as info:
        pre(raw)
    assert (info.value.reason, info.value.sample_id) == (reason, "x.jsonl:3")


def test_too_long_is_skipped_at_the_first_token_over(tmp_path, tok):
    (image,) = make_images(tmp_path, 1, seed=8)
    raw = RawSample("t:1", "t", "pair", images=[ImageRef(path=str(image))], caption="a red circle")
    n = len(tiny_preprocessor(tok)(raw))
    assert len(tiny_preprocessor(tok, max_seq_len=n)(raw)) == n
    with pytest.raises(SkipSample, match=f"{n} tokens") as info:
        tiny_preprocessor(tok, max_seq_len=n - 1)(raw)
    assert info.value.reason == "too_long"
    # The model's context bounds a sample too (packs may be longer: positions restart per sample).
    assert len(tiny_preprocessor(tok, max_seq_len=4 * n, context=n)(raw)) == n
    with pytest.raises(SkipSample, match=f"{n} tokens .* > the model's context of {n - 1} tokens") as info:
        tiny_preprocessor(tok, max_seq_len=4 * n, context=n - 1)(raw)
    assert info.value.reason == "too_long"


def test_corrupt_and_vanished_images(tmp_path, pre):
    (image,) = make_images(tmp_path, 1, seed=9)
    raw = RawSample("b:1", "b", "pair", images=[ImageRef(data=image.path.read_bytes()[:40])], caption="c")
    with pytest.raises(SkipSample) as info:
        pre(raw)
    assert info.value.reason == "corrupt_image"
    image.path.unlink()
    with pytest.raises(SkipSample) as info:
        pre(dataclasses.replace(raw, images=[ImageRef(path=str(image))]))
    assert info.value.reason == "missing_image"


# ---------------------------------------------------------------------------------------------------- setup
def test_construction_errors(tok):
    template = get_template("internlm2-chat")
    with pytest.raises(ValueError, match="fast tokenizer"):
        Preprocessor(type("Slow", (), {"is_fast": False})(), template, 4, 56, 128)
    from tests.mono.conftest import tiny_tokenizer

    bare = tiny_tokenizer()  # a fast tokenizer without the Mono special tokens
    with pytest.raises(ValueError, match="<img>"):
        Preprocessor(bare, template, 4, 56, 128)
    other = ChatTemplate("x", "{system_message}", "", "U:", "A:", turn_end="<|end|>")
    with pytest.raises(ValueError, match="<|end|>"):
        Preprocessor(tok, other, 4, 56, 128)
    with pytest.raises(ValueError, match="max_seq_len"):
        Preprocessor(tok, template, 4, 56, 0)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tokens_per_tile(50, 14)


def test_for_model_reads_the_model_config(tok):
    model = _model(tok, image_size=56)
    data = DataConfig(min_tiles=2, use_thumbnail=False, caption_prompt="Caption:", seed=3)
    pre = Preprocessor.for_model(model.config, tok, data, 777)
    assert (pre.num_image_token, pre.image_size, pre.max_seq_len, pre.template.name) == (4, 56, 777, "internlm2-chat")
    assert pre.context == model.config.llm_config.max_position_embeddings
    assert (pre.min_tiles, pre.use_thumbnail, pre.caption_prompt, pre.seed) == (2, False, "Caption:", 3)
    assert pre.system_message == get_template("internlm2-chat").system_message
    model.config.system_message = "Be brief."
    assert Preprocessor.for_model(model.config, tok, data, 777).system_message == "Be brief."
    model.config.img_context_token_id = pre.img_context_id + 1
    with pytest.raises(ValueError, match="img_context_token_id"):
        Preprocessor.for_model(model.config, tok, data, 777)
    model.config.img_context_token_id = None
    model.config.llm_config.vocab_size = pre.img_context_id
    with pytest.raises(ValueError, match="embedding rows"):
        Preprocessor.for_model(model.config, tok, data, 777)
