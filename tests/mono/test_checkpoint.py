"""Saving and loading in the release layout: names, shapes, shards, and loud errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mono import MonoInternVL
from mono.checkpoint import CheckpointMismatchError, stored_shapes


def _release_names(release_ckpt):
    return {k: tuple(v.shape) for k, v in load_file(release_ckpt / "model.safetensors").items()}


def test_state_dict_names_and_shapes_are_the_release_layout(release_ckpt):
    model = MonoInternVL.from_pretrained(release_ckpt)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _release_names(release_ckpt)


def test_save_load_round_trip_is_bit_exact(release_ckpt, tmp_path):
    model = MonoInternVL.from_pretrained(release_ckpt)
    model.save_pretrained(tmp_path)
    assert stored_shapes(str(tmp_path)) == _release_names(release_ckpt)
    saved = load_file(tmp_path / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved[name], tensor), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    again = MonoInternVL.from_pretrained(tmp_path)
    for name, tensor in again.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_sharded_save_writes_index_and_reloads(release_ckpt, tmp_path):
    model = MonoInternVL.from_pretrained(release_ckpt)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_release_names(release_ckpt))
    again = MonoInternVL.from_pretrained(tmp_path)
    for name, tensor in again.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _write_release_shards(release_ckpt, folder, num_shards=3):
    """Re-shard the release file by hand, as the release's own save would (shards + index)."""
    tensors = load_file(release_ckpt / "model.safetensors")
    names = sorted(tensors)
    folder.mkdir()
    shutil.copy(release_ckpt / "config.json", folder / "config.json")
    weight_map = {}
    for k in range(num_shards):
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::num_shards]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_loads_release_layout_shards_with_index(release_ckpt, tmp_path):
    tensors = _write_release_shards(release_ckpt, tmp_path / "sharded")
    model = MonoInternVL.from_pretrained(tmp_path / "sharded")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensors[name], tensor), name


def _broken_copy(release_ckpt, tmp_path, edit):
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(release_ckpt / "config.json", folder / "config.json")
    tensors = load_file(release_ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_missing_unexpected_and_misshaped_weights_are_listed(release_ckpt, tmp_path):
    def edit(t):
        del t["language_model.model.layers.1.feed_forward_ve.w2.weight"]
        t["language_model.model.layers.0.extra.weight"] = torch.zeros(3)
        t["mlp1.1.weight"] = torch.zeros(48, 95)

    folder = _broken_copy(release_ckpt, tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as err:
        MonoInternVL.from_pretrained(folder)
    msg = str(err.value)
    assert "missing    language_model.model.layers.1.feed_forward_ve.w2.weight (48, 80)" in msg
    assert "unexpected language_model.model.layers.0.extra.weight (3,)" in msg
    assert "mis-shaped mlp1.1.weight: stored (48, 95), config implies (48, 96)" in msg


def test_rotary_buffers_in_old_exports_are_ignored(release_ckpt, tmp_path):
    def edit(t):
        t["language_model.model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(6)

    folder = _broken_copy(release_ckpt, tmp_path, edit)
    MonoInternVL.from_pretrained(folder)


def test_corrupt_safetensors_names_the_file(release_ckpt, tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    shutil.copy(release_ckpt / "config.json", folder / "config.json")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointMismatchError, match="model.safetensors"):
        MonoInternVL.from_pretrained(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        MonoInternVL.from_pretrained(tmp_path / "nope")
