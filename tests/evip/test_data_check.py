"""``evip data check``: the report counts exactly the injected bad samples, lengths are written, exit codes 0/1/2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evip.data.check import check_dataset, format_report, main
from evip.data.sources import build_sources
from evip.data.types import SkipSample
from tests.evip.fixtures import (
    BAD_CASES, tiny_bpe_tokenizer, tiny_preprocessor, write_conversations, write_pairs_jsonl, write_pairs_webdataset,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_bpe_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return [
        write_pairs_webdataset(root / "wds", 5, seed=1, shards=2, bad=BAD_CASES, truncated_shard=True),
        write_pairs_jsonl(root / "jsonl", 5, seed=2, bad=("corrupt_image", "too_long")),
        write_conversations(root / "meta", 6, seed=3, bad=BAD_CASES),
    ]


def test_report_counts_the_injected_bad_samples_and_writes_lengths(tmp_path, mixture):
    pre = tiny_preprocessor()
    report = check_dataset([d.dataset_config() for d in mixture], pre, default_max_tiles=6, out_dir=tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert not report["ok"]
    sources = build_sources([d.dataset_config() for d in mixture], 6)
    for data, source, entry in zip(mixture, sources, report["datasets"]):
        assert entry["samples"] == data.num_samples == len(source)
        assert entry["skipped_by_reason"] == data.expected_skips
        assert entry["used"] == len(data.samples) and entry["skipped"] == sum(data.expected_skips.values())
        assert {r: [x["sample_id"] for x in xs] for r, xs in entry["skipped_examples"].items()} == {
            r: [sid] for r, sid in data.bad_ids.items()
        }
        assert len(entry["problems"]) == data.problems
        lengths = np.load(tmp_path / entry["lengths_file"])
        assert lengths.dtype == np.int32 and lengths.shape == (len(source),)
        for i in range(len(source)):
            try:
                expected = len(pre(source.get(i)))
            except SkipSample:
                expected = -1
            assert lengths[i] == expected
        used = lengths[lengths >= 0]
        assert (entry["tokens"]["min"], entry["tokens"]["max"], entry["tokens"]["total"]) == (
            used.min(), used.max(), used.sum()
        )
        assert sum(entry["tiles"]["histogram"].values()) == entry["used"]
    totals = report["totals"]
    assert totals["skipped"] == sum(sum(d.expected_skips.values()) for d in mixture)
    assert totals["problems"] == 1 and totals["samples"] == sum(d.num_samples for d in mixture)
    assert "problem: " in format_report(report)


def test_worker_processes_give_the_same_report(tmp_path, mixture):
    pre = tiny_preprocessor()
    configs = [d.dataset_config() for d in mixture]
    serial = check_dataset(configs, pre, default_max_tiles=6, out_dir=tmp_path / "a", max_examples=1)
    parallel = check_dataset(configs, pre, default_max_tiles=6, out_dir=tmp_path / "b", max_examples=1, workers=2)
    assert parallel == serial
    for entry in serial["datasets"]:
        a, b = (np.load(tmp_path / run / entry["lengths_file"]) for run in ("a", "b"))
        assert np.array_equal(a, b)


def test_max_examples_caps_the_listed_ids_not_the_counts(tmp_path):
    data = write_pairs_jsonl(tmp_path, 4, seed=4)
    pre = tiny_preprocessor(max_seq_len=50)
    report = check_dataset([data.dataset_config()], pre, default_max_tiles=6, max_examples=2)
    (entry,) = report["datasets"]
    assert entry["skipped_by_reason"] == {"too_long": 4} and len(entry["skipped_examples"]["too_long"]) == 2


def _args(path, tokenizer_dir, out, *extra):
    return [str(path), "--tokenizer", str(tokenizer_dir), "--image-size", "56", "--max-seq-len", "1024",
            "--out", str(out), "--progress", "off", *extra]


def test_main_exit_codes(tmp_path, tokenizer_dir, capsys):
    clean = write_pairs_jsonl(tmp_path / "clean", 4, seed=5)
    assert main(_args(clean.path, tokenizer_dir, tmp_path / "r0")) == 0
    report = json.loads((tmp_path / "r0" / "report.json").read_text())
    assert report["ok"] and report["totals"]["used"] == 4 and report["settings"]["num_image_token"] == 4
    assert (tmp_path / "r0" / "lengths" / "00-pairs.jsonl.npy").is_file()

    bad = write_pairs_webdataset(tmp_path / "bad", 4, seed=6, bad=("corrupt_image",))
    assert main(_args(bad.path, tokenizer_dir, tmp_path / "r1", "--workers", "2")) == 1
    assert json.loads((tmp_path / "r1" / "report.json").read_text())["totals"]["skipped_by_reason"] == {
        "corrupt_image": 1
    }
    assert bad.bad_ids["corrupt_image"] in capsys.readouterr().out

    meta = write_conversations(tmp_path / "meta", 3, seed=7)
    assert main(_args(meta.path, tokenizer_dir, tmp_path / "r2", "--max-tiles", "2")) == 0
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["datasets"][0]["tiles"]["max"] <= 3

    capsys.readouterr()
    usage = [
        [],
        [str(clean.path)],  # no tokenizer
        _args(tmp_path / "nope.jsonl", tokenizer_dir, tmp_path / "x"),
        _args(tmp_path / "data.txt", tokenizer_dir, tmp_path / "x"),  # format not known from the name
        _args(clean.path, tmp_path / "no-tokenizer", tmp_path / "x"),
        _args(clean.path, tokenizer_dir, tmp_path / "x", "--image-size", "50"),
        _args(clean.path, tokenizer_dir, tmp_path / "x", "--format", "csv"),
        _args(clean.path, tokenizer_dir, tmp_path / "x", "--template", "nope"),
    ]
    for argv in usage:
        assert main(argv) == 2, argv
    assert not (tmp_path / "x").exists()
    assert "error" in capsys.readouterr().err


def test_main_with_a_stage_config(tmp_path, tokenizer_dir):
    data = write_conversations(tmp_path / "data", 4, seed=8, bad=("too_long",))
    config = tmp_path / "stage.yaml"
    config.write_text(
        f"stage: s2\noutput_dir: {tmp_path / 'run'}\n"
        f"model:\n  tokenizer: {tokenizer_dir}\n  image_size: 56\n"
        f"data:\n  max_seq_len: 1024\n  max_tiles: 3\n  datasets:\n    - path: {data.path}\n      format: meta\n"
    )
    assert main(["--config", str(config), "--progress", "off"]) == 1
    report = json.loads((tmp_path / "run" / "data-check" / "report.json").read_text())
    assert report["settings"] == {"max_seq_len": 1024, "num_image_token": 4, "image_size": 56,
                                  "template": "internlm2-chat", "min_tiles": 1, "use_thumbnail": True}
    assert report["totals"]["skipped_by_reason"] == {"too_long": 1} and report["datasets"][0]["max_tiles"] == 3
    assert main(["--config", str(config), "--override", "data.max_seq_len=4096", "--out", str(tmp_path / "o")]) == 0
    assert main(["--config", str(config), "--override", "data.max_seqlen=4096"]) == 2
    assert main(["--config", str(config), "--max-seq-len", "10"]) == 2
    assert main(["--config", str(config), str(data.path)]) == 2


def test_an_unexpected_error_names_the_sample(tmp_path, mixture):
    from evip.data.check import CheckError, check_sources

    class Broken:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, raw, epoch=0):
            if raw.sample_id.endswith(":2"):
                raise KeyError("boom")
            return self.inner(raw, epoch)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    sources = build_sources([mixture[1].dataset_config()], 6)
    with pytest.raises(CheckError, match=r"checking .*:2 of dataset .* failed: KeyError"):
        check_sources(sources, Broken(tiny_preprocessor(max_seq_len=512)))
