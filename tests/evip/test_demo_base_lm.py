"""The demo's base LM: corpus split, cache and atomic build, determinism, and the perplexity the demo relies on
(bit-identical between the plain LM and the Mono model converted from it). Tiny sizes: every build is seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evip.demo import base_lm
from evip.demo.base_lm import BaseLMConfig, build_base_lm, build_corpus, perplexity
from mono.internlm2 import InternLM2ForCausalLM
from mono.modeling import MonoInternVL
from mono.tokenization import SPECIAL_TOKENS, check_tokenizer, load_tokenizer

TINY = BaseLMConfig(
    vocab_size=400, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, seq_len=64, batch_size=4, steps=20, warmup_steps=4,
    lr=1e-2, num_threads=1, log_every=10, max_doc_chars=60_000,
)
EXTRA = [f"The {c} {s} is at the {p} of the picture." for c in ("red", "blue", "green") for s in ("circle", "square")
         for p in ("top", "bottom", "left", "right")]
PAIRS = [("What colour is the circle?", "The circle is red."),
         ("How many squares are there?", "There are two squares.")]


def _build(folder: Path, config: BaseLMConfig = TINY, **kwargs) -> base_lm.BaseLM:
    return build_base_lm(folder, config, extra_texts=EXTRA, chat_pairs=PAIRS, log=lambda line: None, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> base_lm.BaseLM:
    return _build(tmp_path_factory.mktemp("base") / "lm")


def test_corpus_split_and_chat_format():
    corpus = build_corpus(TINY, EXTRA, PAIRS)
    assert corpus.held_out_texts and corpus.held_out_extra == (EXTRA[10],)
    # No held-out paragraph of substance is trained on, even where the documentation repeats a section.
    trained = {q.strip() for t in corpus.train_texts for q in t.split("\n\n")}
    held = {q.strip() for t in corpus.held_out_texts for q in t.split("\n\n") if len(q.strip()) >= 40}
    assert held and not held & trained
    assert EXTRA[10] not in corpus.train_texts and EXTRA[0] in corpus.train_texts
    rendered = [c for c in corpus.conversations if "What colour is the circle?" in c]
    assert rendered and rendered[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    turn = "<|im_start|>user\nWhat colour is the circle?<|im_end|><|im_start|>assistant\nThe circle is red.<|im_end|>"
    assert turn in rendered[0]
    # The full documentation (TINY uses its first 60k characters); its headings give conversations even when
    # the caller brings no pairs.
    full = build_corpus(BaseLMConfig())
    assert sum(map(len, full.train_texts)) > 300_000 and sum(map(len, corpus.train_texts)) < 70_000
    assert len(full.conversations) > 50


def test_folder_loads_through_from_llm(built):
    tokenizer = load_tokenizer(built.folder)
    check_tokenizer(tokenizer)
    for token in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    config = json.loads((built.folder / "config.json").read_text())
    assert config["architectures"] == ["InternLM2ForCausalLM"] and config["vocab_size"] == len(tokenizer)
    assert not config["tie_word_embeddings"]
    model = MonoInternVL.from_llm(built.folder, tokenizer=tokenizer, system_message=built.system_message)
    assert model.config.llm_config.vocab_size == len(tokenizer)
    assert model.config.img_context_token_id == tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[2])


def test_training_lowers_held_out_perplexity(built):
    assert built.steps == TINY.steps and len(built.losses) == TINY.steps and not built.cached
    assert built.held_out_perplexity < 0.7 * built.initial_perplexity
    tokenizer = load_tokenizer(built.folder)
    # An untrained model of the same shape, evaluated independently of the build.
    untrained = InternLM2ForCausalLM(InternLM2ForCausalLM.config_class.from_pretrained(built.folder)).eval()
    untrained_ppl = perplexity(untrained, tokenizer, built.held_out_texts, TINY.seq_len)
    trained_ppl = perplexity(built.folder, tokenizer, built.held_out_texts, TINY.seq_len)
    assert trained_ppl == built.held_out_perplexity  # the recorded figure is reproduced exactly from the files
    assert trained_ppl < 0.7 * untrained_ppl


def test_plain_and_mono_perplexity_are_bit_identical(built, tmp_path):
    tokenizer = load_tokenizer(built.folder)
    plain = InternLM2ForCausalLM.from_pretrained(str(built.folder), dtype=torch.float32)
    mono = MonoInternVL.from_llm(built.folder, tokenizer=load_tokenizer(built.folder)).float()
    texts = list(built.held_out_texts[:3]) + list(built.held_out_extra)
    ids = torch.tensor([tokenizer(texts[0])["input_ids"][: TINY.seq_len]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, mono(input_ids=ids).logits)
    ppl_plain = perplexity(plain, tokenizer, texts, TINY.seq_len)
    assert ppl_plain == perplexity(mono, tokenizer, texts, TINY.seq_len)
    assert ppl_plain == perplexity(built.folder, None, texts, TINY.seq_len)
    mono.save_pretrained(tmp_path / "mono")  # a saved Mono checkpoint (release layout) evaluates the same
    assert ppl_plain == perplexity(tmp_path / "mono", tokenizer, texts, TINY.seq_len)


def test_perplexity_restores_mode_and_refuses_half_precision(built):
    model = InternLM2ForCausalLM.from_pretrained(str(built.folder), dtype=torch.float32).train()
    tokenizer = load_tokenizer(built.folder)
    perplexity(model, tokenizer, built.held_out_extra, TINY.seq_len)
    assert model.training
    with pytest.raises(ValueError, match="fp32"):
        perplexity(model.to(torch.bfloat16), tokenizer, built.held_out_extra, TINY.seq_len)
    with pytest.raises(ValueError, match="two tokens"):
        perplexity(model.float(), tokenizer, [""], TINY.seq_len)


def test_cache_hit_skips_training_and_a_changed_config_retrains(built, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached build must not train")

    # A rebuild starts by training the tokenizer; refusing that is the cheapest proof of a (non-)rebuild.
    with monkeypatch.context() as patch:
        patch.setattr(base_lm, "_train_tokenizer", no_training)
        again = _build(built.folder)
        # Threads and logging are not part of the recipe: changing them still hits the cache.
        _build(built.folder, dataclasses.replace(TINY, num_threads=2, log_every=3))
    assert again.cached and again.losses == built.losses and again.held_out_perplexity == built.held_out_perplexity
    assert again.held_out_texts == built.held_out_texts
    with monkeypatch.context() as patch:
        patch.setattr(base_lm, "_train_tokenizer", no_training)
        with pytest.raises(AssertionError, match="must not train"):
            _build(built.folder, dataclasses.replace(TINY, steps=TINY.steps + 1))
        with pytest.raises(AssertionError, match="must not train"):  # other inputs: another corpus hash
            build_base_lm(built.folder, TINY, extra_texts=EXTRA[:-1], chat_pairs=PAIRS, log=lambda line: None)
    # The refused rebuilds left the finished folder in place.
    assert _build(built.folder).cached


def test_interrupted_build_is_not_taken_as_finished(tmp_path):
    folder = tmp_path / "lm"

    def interrupt(line: str) -> None:
        if "step 10/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_base_lm(folder, TINY, extra_texts=EXTRA, chat_pairs=PAIRS, log=interrupt)
    assert not folder.exists() and list(tmp_path.iterdir()) == []
    # A build killed outright leaves its temporary sibling behind; the next build removes it.
    stale = tmp_path / ".lm.tmp-999999"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    first = _build(folder)
    assert not first.cached and not stale.exists()
    # A folder with weights but no marker, or a cut-off one (copied half-way, written by something else), is rebuilt.
    marker = folder / base_lm.MARKER
    marker.write_text(marker.read_text()[:100])
    assert not _build(folder).cached
    marker.unlink()
    rebuilt = _build(folder)
    assert not rebuilt.cached and marker.is_file() and _build(folder).cached


def test_same_seed_gives_identical_weights(tmp_path, built):
    again = _build(tmp_path / "again")
    first, second = load_file(built.folder / "model.safetensors"), load_file(again.folder / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.losses == built.losses
    assert (built.folder / "tokenizer.json").read_text() == (again.folder / "tokenizer.json").read_text()
    other = load_file(_build(tmp_path / "other", dataclasses.replace(TINY, seed=1)).folder / "model.safetensors")
    assert not torch.equal(first["output.weight"], other["output.weight"])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="seq_len"):
        BaseLMConfig(seq_len=2048)
    with pytest.raises(ValueError, match="chat_share"):
        BaseLMConfig(chat_share=1.0)
    with pytest.raises(ValueError, match="num_attention_heads"):
        BaseLMConfig(hidden_size=100, num_attention_heads=8)
