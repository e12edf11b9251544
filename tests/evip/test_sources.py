"""Data sources: every format indexes and yields the right raw samples; bad records are skips naming the sample."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from evip.data.sources import JsonlSource, WebDatasetSource, build_sources, meta_sources
from evip.data.types import RawSample, SkipSample
from evip.job import DatasetConfig
from tests.evip.fixtures import write_conversations, write_pairs_jsonl, write_pairs_webdataset

SOURCE_REASONS = {"malformed_json", "missing_image"}  # the bad cases a source itself must catch


def _read_all(source) -> tuple[dict[str, RawSample], dict[str, SkipSample]]:
    good, bad = {}, {}
    for i in range(len(source)):
        try:
            raw = source.get(i)
        except SkipSample as skip:
            bad[skip.sample_id] = skip
        else:
            assert raw.index == i
            good[raw.sample_id] = raw
    return good, bad


def _image_bytes(raw: RawSample) -> list[bytes]:
    return [ref.data if ref.data is not None else Path(ref.path).read_bytes() for ref in raw.images]


def _assert_matches(source, data) -> None:
    """Good samples equal what the writer wrote; bad ones at the source are skips with the writer's sample id."""
    assert len(source) == data.num_samples
    good, bad = _read_all(source)
    for sid, expected in data.samples.items():
        raw = good[sid]
        assert raw.kind == expected["kind"] and raw.dataset == source.name
        assert raw.max_tiles == source.max_tiles and raw.augment == source.augment
        want = [e if isinstance(e, bytes) else Path(e).read_bytes() for e in expected["images"]]
        assert _image_bytes(raw) == want, sid
        if raw.kind == "pair":
            assert raw.caption == expected["caption"]
        else:
            assert raw.conversation == expected["conversation"]
    assert {s.sample_id: s.reason for s in bad.values()} == {
        sid: reason for reason, sid in data.bad_ids.items() if reason in SOURCE_REASONS
    }
    for skip in bad.values():
        assert skip.sample_id in str(skip)


@pytest.mark.parametrize("bad", [(), ("malformed_json", "missing_image", "corrupt_image", "bad_conversation")])
def test_webdataset_pairs(tmp_path, bad):
    data = write_pairs_webdataset(tmp_path / "shards", 9, seed=1, shards=3, bad=bad)
    source = WebDatasetSource(tmp_path / "shards", max_tiles=4)
    assert source.kind == "pair" and source.problems == [] and len(source.shards) == 3
    _assert_matches(source, data)


def test_webdataset_single_shard_and_glob(tmp_path):
    data = write_pairs_webdataset(tmp_path, 6, seed=2, shards=2)
    one = WebDatasetSource(tmp_path / "pairs-000001.tar")
    assert len(one) == 3 and all(one.sample_id(i).startswith("pairs-000001.tar:") for i in range(3))
    both = WebDatasetSource(str(tmp_path / "pairs-*.tar"))
    assert len(both) == 6
    _assert_matches(both, data)


def test_webdataset_truncated_shard_is_a_problem_not_a_crash(tmp_path):
    data = write_pairs_webdataset(tmp_path, 6, seed=3, shards=2, truncated_shard=True)
    source = WebDatasetSource(tmp_path)
    assert len(source.problems) == data.problems == 1
    assert "pairs-000002.tar" in source.problems[0] and "truncated" in source.problems[0]
    _assert_matches(source, data)


def test_webdataset_corrupt_header_and_non_tar(tmp_path):
    write_pairs_webdataset(tmp_path, 4, seed=4, shards=1)
    intact = WebDatasetSource(tmp_path / "pairs-000000.tar")
    assert len(intact) == 4
    # Overwrite the third sample's first header: tarfile stops there quietly, as at an archive's end; the source
    # must index the two samples before it and say that the rest was lost.
    header = intact._entries[2][2][0][1] - 512
    raw = bytearray((tmp_path / "pairs-000000.tar").read_bytes())
    raw[header:header + 512] = b"\x07" * 512
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.tar").write_bytes(bytes(raw))
    (tmp_path / "broken" / "y.tar").write_bytes(b"not a tar file at all" * 40)
    source = WebDatasetSource(tmp_path / "broken")
    assert len(source.problems) == 2, source.problems
    assert f"invalid tar header at byte {header}" in source.problems[0] and "y.tar" in source.problems[1]
    assert [source.sample_id(i) for i in range(len(source))] == ["x.tar:000000", "x.tar:000001"]


def _shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_webdataset_json_records(tmp_path):
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A shape."}]
    _shard(tmp_path / "s.tar", {
        "a.jpg": b"A", "a.json": json.dumps({"conversations": conv}).encode(),
        "b.json": json.dumps({"conversations": [{"from": "human", "value": "Hi"}, conv[1]]}).encode(),
        "c.png": b"C", "c.txt": b"from txt\n", "c.json": json.dumps({"caption": "from json"}).encode(),
        "d.webp": b"D", "d.txt": b"only txt",
        "dir/e.jpeg": b"E", "dir/e.json": json.dumps({"text": "nested key"}).encode(),
        "f.json": json.dumps({"conversations": conv}).encode(),
        "g.jpg": b"G", "g.json": b"[1, 2]",
        "h.jpg": b"H", "h.cls": b"3",
    })
    source = WebDatasetSource(tmp_path / "s.tar")
    assert source.kind == "conversation" and len(source) == 8  # h: an image without any caption member
    got = {}
    for i in range(len(source)):
        try:
            raw = source.get(i)
            got[raw.sample_id] = (raw.kind, [r.data for r in raw.images], raw.caption or raw.conversation)
        except SkipSample as skip:
            got[skip.sample_id] = skip.reason
    assert got == {
        "s.tar:a": ("conversation", [b"A"], [("user", "<image>\nWhat is it?"), ("assistant", "A shape.")]),
        "s.tar:b": ("conversation", [], [("user", "Hi"), ("assistant", "A shape.")]),
        "s.tar:c": ("pair", [b"C"], "from json"),
        "s.tar:d": ("pair", [b"D"], "only txt"),
        "s.tar:dir/e": ("pair", [b"E"], "nested key"),
        "s.tar:f": "missing_image",  # <image> in the conversation, no image member
        "s.tar:g": "malformed_json",
        "s.tar:h": "malformed_json",
    }


def test_jsonl_pairs_ids_are_file_lines(tmp_path):
    data = write_pairs_jsonl(tmp_path, 8, seed=5, bad=("malformed_json", "missing_image"))
    source = JsonlSource(data.path, name="pairs", max_tiles=3, augment=True, repeat=0.5)
    assert source.kind == "pair" and source.repeat == 0.5
    lines = data.path.read_text().splitlines()
    assert lines[2] == "" and source.sample_id(2) == "pairs.jsonl:4"  # the blank line 3 is not a sample
    for i in range(len(source)):
        line_no = int(source.sample_id(i).split(":")[1])
        assert lines[line_no - 1].strip()
    _assert_matches(source, data)


def test_jsonl_image_root(tmp_path):
    data = write_pairs_jsonl(tmp_path / "a", 3, seed=6)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "a" / "images").rename(moved / "images")
    with pytest.raises(SkipSample) as info:
        JsonlSource(data.path).get(0)
    assert info.value.reason == "missing_image" and info.value.sample_id == "pairs.jsonl:1"
    assert JsonlSource(data.path, image_root=moved).get(0).images[0].path.startswith(str(moved))


def test_jsonl_record_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    rows = [
        ("[1, 2]", "malformed_json"),
        ('{"image": "x.png"}', "malformed_json"),
        ('{"image": "x.png", "caption": 3}', "malformed_json"),
        ('{"image": ["x.png", "x.png"], "caption": "two"}', "malformed_json"),
        ('{"conversations": "hi"}', "malformed_json"),
        ('{"conversations": [{"from": "human"}]}', "malformed_json"),
        ('{"conversations": [{"from": "robot", "value": "hi"}]}', "bad_conversation"),
        ('{"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}]}', "bad_conversation"),
        ('{"image": 5, "conversations": [{"from": "human", "value": "a"}]}', "malformed_json"),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(r for r, _ in rows) + "\n")
    source = JsonlSource(path)
    for i, (_, reason) in enumerate(rows):
        with pytest.raises(SkipSample) as info:
            source.get(i)
        assert (info.value.reason, info.value.sample_id) == (reason, f"bad.jsonl:{i + 1}"), info.value


def test_jsonl_conversation_kinds(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    path = tmp_path / "c.jsonl"
    rows = [
        {"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"image": "a.jpg", "conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "<image>"},
                                             {"from": "assistant", "value": "A"}]},
        {"image": ["a.jpg", "a.jpg"],
         "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))  # no trailing newline
    source = JsonlSource(path)
    assert source.kind == "conversation" and len(source) == 3
    text_only, with_system, two = (source.get(i) for i in range(3))
    assert text_only.images == [] and text_only.conversation == [("user", "hi"), ("assistant", "yo")]
    assert with_system.conversation == [("system", "S"), ("user", "<image>"), ("assistant", "A")]
    assert [r.path for r in two.images] == [str(tmp_path / "a.jpg")] * 2


def test_meta_entries(tmp_path):
    data = write_conversations(tmp_path, 6, seed=7, bad=("missing_image",), max_dynamic_patch=2, repeat_time=2,
                               data_augment=True)
    (source,) = meta_sources(data.path, default_max_tiles=6, repeat=1.5)
    assert (source.name, source.max_tiles, source.augment, source.repeat) == ("convs", 2, True, 3.0)
    assert source.image_root == str(tmp_path / "images")
    _assert_matches(source, data)


def test_meta_paths_fall_back_to_the_working_directory(tmp_path, monkeypatch):
    data = write_conversations(tmp_path / "data", 2, seed=8)
    meta = json.loads(data.path.read_text())
    meta["convs"].update(root="data/images", annotation="data/convs.jsonl")
    elsewhere = tmp_path / "configs" / "meta.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    (source,) = meta_sources(elsewhere, default_max_tiles=6)
    assert Path(source.path).resolve() == (tmp_path / "data" / "convs.jsonl").resolve()
    monkeypatch.chdir(tmp_path / "configs")
    with pytest.raises(FileNotFoundError, match="entry 'convs'.*annotation 'data/convs.jsonl' not found"):
        meta_sources(elsewhere, default_max_tiles=6)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"root": ".", "annotation": "c.jsonl", "shuffle": True}, r"unknown key\(s\) \['shuffle'\]"),
        ({"annotation": "c.jsonl"}, r"missing required key\(s\) \['root'\]"),
        ({"root": ".", "annotation": "c.jsonl", "repeat_time": 0}, "repeat_time"),
        ({"root": ".", "annotation": "c.jsonl", "max_dynamic_patch": "6"}, "max_dynamic_patch"),
        ({"root": "s3://bucket/images", "annotation": "c.jsonl"}, "URL"),
    ],
)
def test_meta_config_errors_name_file_and_entry(tmp_path, entry, match):
    (tmp_path / "c.jsonl").write_text("{}\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"ds": entry}))
    with pytest.raises(ValueError, match=match) as info:
        meta_sources(meta, default_max_tiles=6)
    assert str(meta) in str(info.value) and "'ds'" in str(info.value)


def test_build_sources_errors_name_the_dataset(tmp_path):
    write_pairs_jsonl(tmp_path, 2, seed=9)
    (tmp_path / "empty").mkdir()
    configs = [DatasetConfig(path=tmp_path / "pairs.jsonl", format="jsonl")]
    assert len(build_sources(configs, 6)) == 1
    with pytest.raises(FileNotFoundError, match=r"data\.datasets\[1\] .*nope\.jsonl"):
        build_sources(configs + [DatasetConfig(path=tmp_path / "nope.jsonl", format="jsonl")], 6)
    with pytest.raises(FileNotFoundError, match=r"data\.datasets\[0\] .*no \.tar shards"):
        build_sources([DatasetConfig(path=tmp_path / "empty", format="webdataset")], 6)
    with pytest.raises(ValueError, match=r"data\.datasets\[0\] .*max_tiles"):
        build_sources([DatasetConfig(path=tmp_path / "pairs.jsonl", format="jsonl", max_tiles=0)], 6)


def test_build_sources_settings(tmp_path):
    pairs = write_pairs_jsonl(tmp_path / "p", 2, seed=10)
    shards = write_pairs_webdataset(tmp_path / "w", 2, seed=10, shards=1)
    convs = write_conversations(tmp_path / "c", 2, seed=10)
    sources = build_sources(
        [
            DatasetConfig(path=pairs.path, format="jsonl", name="p", max_tiles=2, repeat=2.0),
            DatasetConfig(path=shards.path, format="webdataset", augment=True),
            DatasetConfig(path=convs.path, format="meta", repeat=0.5),
        ],
        default_max_tiles=5,
    )
    got = [(s.name, s.kind, s.max_tiles, s.augment, s.repeat, len(s)) for s in sources]
    assert got == [
        ("p", "pair", 2, False, 2.0, 2), ("w", "pair", 5, True, 1.0, 2), ("convs", "conversation", 5, False, 0.5, 2)
    ]


class _Reader(torch.utils.data.IterableDataset):
    """Reads its worker's share of a source (the parent has read from it before the fork)."""

    def __init__(self, source):
        self.source = source

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for i in range(info.id, len(self.source), info.num_workers):
            raw = self.source.get(i)
            # The source's handles must be this process's own (reopened after the fork), not the parent's.
            assert self.source._files._pid == os.getpid()
            yield raw.sample_id, _image_bytes(raw)[0], os.getpid()


@pytest.mark.parametrize("fmt", ["webdataset", "jsonl"])
def test_forked_workers_read_the_same_samples(tmp_path, fmt):
    writer = write_pairs_webdataset if fmt == "webdataset" else write_pairs_jsonl
    data = writer(tmp_path, 8, seed=11)
    (source,) = build_sources([data.dataset_config()], 6)
    serial = {source.get(i).sample_id: _image_bytes(source.get(i))[0] for i in range(len(source))}  # opens handles
    loader = torch.utils.data.DataLoader(
        _Reader(source), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    rows = list(loader)
    assert {sid: data for sid, data, _ in rows} == serial and len(rows) == len(serial)
    assert len({pid for _, _, pid in rows}) == 2 and os.getpid() not in {pid for _, _, pid in rows}
    assert source.get(0).sample_id in serial  # the parent's handles still work after the workers are gone
