"""MonoInternVL.from_llm: Llama-family and InternLM2 decoders become Mono models without changing text outputs."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mono import InternLM2Config, InternLM2ForCausalLM, MonoInternVL

from .conftest import tiny_tokenizer


def _llama(tied=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=120, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _text_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("tied", [True, False])
def test_llama_in_memory_conversion_keeps_text_logits(tied):
    llama = _llama(tied)
    ids = torch.randint(0, 120, (2, 13))
    mono = MonoInternVL.from_llm(llama).eval()
    diff = (_text_logits(mono, ids) - _text_logits(llama, ids)).abs().max().item()
    assert diff < 1e-5, diff


def test_llama_folder_conversion(tmp_path):
    llama = _llama()
    llama.save_pretrained(tmp_path)
    ids = torch.randint(0, 120, (1, 9))
    mono = MonoInternVL.from_llm(str(tmp_path)).eval()
    torch.testing.assert_close(_text_logits(mono, ids), _text_logits(llama, ids), rtol=1e-5, atol=1e-5)


def test_internlm2_folder_conversion(tmp_path):
    torch.manual_seed(1)
    lm = InternLM2ForCausalLM(
        InternLM2Config(
            architectures=["InternLM2ForCausalLM"], vocab_size=100, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        )
    ).eval()
    lm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["InternLM2ForCausalLM"]
    mono = MonoInternVL.from_llm(str(tmp_path)).eval()
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(_text_logits(mono, ids), _text_logits(lm, ids))


def test_visual_experts_start_as_copies_of_the_text_ffn():
    mono = MonoInternVL.from_llm(_llama(), visual_attention_experts=True)
    for layer in mono.language_model.model.layers:
        for w in ("w1", "w2", "w3"):
            a, b = getattr(layer.feed_forward, w).weight, getattr(layer.feed_forward_ve, w).weight
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
        assert torch.equal(layer.attention.wqkv.weight, layer.attention_ve.wqkv.weight)
        assert torch.equal(layer.attention.wo.weight, layer.attention_ve.wo.weight)


def test_tokenizer_gains_special_tokens_and_rows_grow_to_match():
    llama = _llama()
    tok = tiny_tokenizer()
    base = len(tok)
    mono = MonoInternVL.from_llm(llama, tokenizer=tok, template="chatml")
    assert len(tok) == base + 9
    vocab = mono.config.llm_config.vocab_size
    assert vocab == max(120, len(tok))
    assert mono.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    emb = mono.get_input_embeddings().weight
    out = mono.get_output_embeddings().weight
    torch.testing.assert_close(emb[120:], llama.get_input_embeddings().weight.mean(0).expand(vocab - 120, -1))
    torch.testing.assert_close(out[120:], llama.lm_head.weight.mean(0).expand(vocab - 120, -1))


def test_save_and_reload_converted_model(tmp_path):
    mono = MonoInternVL.from_llm(_llama(), image_size=56).eval()
    mono.save_pretrained(tmp_path)
    again = MonoInternVL.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 120, (1, 6))
    assert torch.equal(_text_logits(mono, ids), _text_logits(again, ids))


def test_unsupported_source_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        MonoInternVL.from_llm(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        MonoInternVL.from_llm(str(tmp_path / "missing"))


def test_new_parts_are_materialised_and_seeded():
    a = MonoInternVL.from_llm(_llama(), seed=3)
    b = MonoInternVL.from_llm(_llama(), seed=3)
    c = MonoInternVL.from_llm(_llama(), seed=4)
    assert not any(p.is_meta for p in a.parameters())
    assert all(torch.isfinite(p).all() for p in a.parameters())
    pe = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(a.state_dict()[pe], b.state_dict()[pe])
    assert not torch.equal(a.state_dict()[pe], c.state_dict()[pe])
    assert torch.equal(a.state_dict()["mlp1.0.weight"], torch.ones(4 * 48))


def test_pad_row_trains_when_pad_is_an_end_token():
    from mono.internlm2 import _padding_idx

    assert _padding_idx(InternLM2Config(pad_token_id=0, eos_token_id=2)) == 0  # the release: pad <unk> frozen
    assert _padding_idx(InternLM2Config(pad_token_id=2, eos_token_id=2)) is None  # SmolLM2: pad == <|im_end|>
