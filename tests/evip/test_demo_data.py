"""The EViP demo's bundled data: deterministic, readable by the engine with zero skips, ground truth consistent
with the pixels and the answers, held-out digits and scenes kept out of training, the stated caption noise."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evip.data.check import check_dataset
from evip.data.sources import build_sources
from evip.demo.datasets import (
    EVAL_TASKS, QUESTIONS, SCENE_KINDS, DemoDataSizes, grounding_answer, load_demo_data, parse_grounding, text_corpus,
    write_demo_data,
)
from evip.demo.scenes import (
    COLOURS, DIGITS_HELD_OUT_START, SHAPES, digit_indices, digit_label, normalise_box, position_of, render_scene,
    sample_scene,
)
from mono.tokenization import train_bpe_tokenizer
from tests.evip.fixtures import tiny_preprocessor

SMALL = DemoDataSizes(s1_1=30, s1_2=12, s1_3_shapes=10, s1_3_scenes=16, s1_3_digits=12, s2_scenes=10, s2_digits=6, s2_text=6,
                      eval_per_task=8, shard_size=7)
NAMES = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _shard_records(folder: Path) -> list[dict]:
    """``{"key", "image", "caption", "meta"}`` of every key of the shards in ``folder``, in order."""
    records: dict[tuple[str, str], dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                records.setdefault((shard.name, key), {"key": key})[ext] = tf.extractfile(member).read()
    return [{"key": r["key"], "image": r["jpg"], "caption": r["txt"].decode().strip(), "meta": json.loads(r["json"])}
            for r in records.values()]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), seed=3, sizes=SMALL)



# ---------------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path, demo):
    again = write_demo_data(tmp_path / "again", seed=3, sizes=SMALL, workers=2)  # parts written side by side
    first, second = _hashes(demo.root), _hashes(again.root)
    assert first == second and len(first) > 80
    other = _hashes(write_demo_data(tmp_path / "other", seed=4, sizes=SMALL).root)
    assert first["s1_1/shard-000000.tar"] != other["s1_1/shard-000000.tar"]
    assert first["eval/count.jsonl"] != other["eval/count.jsonl"]


def test_parts_use_their_own_streams(tmp_path, demo):
    # More S2 text changes S2 only: every other part stays byte-identical.
    changed = _hashes(write_demo_data(tmp_path / "more", seed=3, sizes=replace(SMALL, s2_text=9)).root)
    base = _hashes(demo.root)
    differ = {path.split("/")[0] for path in base if base[path] != changed.get(path)}
    assert differ == {"s2", "manifest.json"}


def test_second_write_is_a_no_op_and_new_settings_rewrite(tmp_path):
    root = tmp_path / "data"
    tiny = replace(SMALL, s1_1=5, s1_2=5, s1_3_shapes=3, s1_3_scenes=4, s1_3_digits=3, s2_scenes=3, s2_digits=2, s2_text=2,
                   eval_per_task=3)
    first = write_demo_data(root, seed=0, sizes=tiny)
    (root / "unrelated.txt").write_text("kept")
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert write_demo_data(root, seed=0, sizes=tiny) == first == load_demo_data(root)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    second = write_demo_data(root, seed=1, sizes=tiny, noise_share=0.4)
    manifest = json.loads(second.manifest.read_text())
    assert (manifest["seed"], manifest["noise_share"]) == (1, 0.4)
    assert (root / "unrelated.txt").read_text() == "kept"
    assert _hashes(root) == {**_hashes(write_demo_data(tmp_path / "fresh", seed=1, sizes=tiny, noise_share=0.4).root),
                             "unrelated.txt": hashlib.sha256(b"kept").hexdigest()}
    # An interrupted write leaves no manifest: the next call writes everything again.
    second.manifest.unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_demo_data(root)
    assert write_demo_data(root, seed=1, sizes=tiny, noise_share=0.4).manifest.is_file()


def test_bad_sizes_and_noise_share_are_refused():
    with pytest.raises(ValueError, match="s1_2"):
        DemoDataSizes(s1_2=0)
    with pytest.raises(ValueError, match="shard_size"):
        DemoDataSizes(shard_size=1.5)
    with pytest.raises(ValueError, match="noise_share"):
        write_demo_data(Path("unused"), noise_share=1.0)
    with pytest.raises(ValueError, match="workers"):
        write_demo_data(Path("unused"), workers=0)


# ---------------------------------------------------------------------------------------------------- engine
def test_every_stage_reads_and_checks_with_zero_skips(tmp_path, demo, one_thread):
    tokenizer = train_bpe_tokenizer(text_corpus(200))
    preprocessor = tiny_preprocessor(tokenizer, image_size=112, max_seq_len=2048)
    expected_kind = {"s1.1": "pair", "s1.2": "pair", "s1.3-shapes": "conversation", "s1.3": "conversation",
                     "s2": "conversation"}
    tiles = set()
    for stage, data in demo.stages.items():
        sources = build_sources(demo.datasets(stage), 4)
        assert sum(len(s) for s in sources) == data.samples > 0
        assert {s.kind for s in sources} == {expected_kind[stage]}
        report = check_dataset(demo.datasets(stage), preprocessor, default_max_tiles=4, out_dir=tmp_path / stage)
        assert report["ok"], report
        assert report["totals"]["skipped"] == 0 and report["totals"]["used"] == data.samples
        tiles |= {int(t) for e in report["datasets"] for t in e["tiles"]["histogram"]}
    # Text-only: no tile; 1:1 scenes and digits: one; the other aspect ratios: two tiles + a thumbnail.
    assert tiles == {0, 1, 3}
    text_only = _jsonl(demo.root / "s2" / "text.jsonl")
    assert len(text_only) == SMALL.s2_text and all("image" not in r for r in text_only)
    assert all(2 <= len(r["conversations"]) // 2 <= 3 for r in _jsonl(demo.root / "s2" / "scenes.jsonl"))


def test_manifest_counts_match_the_files(demo):
    manifest = json.loads(demo.manifest.read_text())
    assert manifest["seed"] == 3 and manifest["sizes"]["s1_1"] == SMALL.s1_1
    meta = json.loads((demo.root / "s1_3" / "meta.json").read_text())
    for task, entry in meta.items():
        assert demo.counts["s1.3"][task] == entry["length"] == len(_jsonl(demo.root / "s1_3" / entry["annotation"]))
    for task, path in demo.eval_files.items():
        assert demo.counts["eval"][task] == len(_jsonl(path)) == SMALL.eval_per_task
    assert demo.counts["s1.3"]["digit"] == SMALL.s1_3_digits
    assert meta["digit"]["repeat_time"] == 2 and meta["grounding"]["repeat_time"] == 1.5
    assert meta["objects"]["repeat_time"] == meta["groups"]["repeat_time"] == 1
    # Object and group scenes alternate: an object scene gives two samples (shape or colour in objects.jsonl;
    # grounding and OCR in grounding.jsonl), a group scene one (count, OCR, sometimes the caption); the image comes
    # with the first turn only.
    objects, groups = (SMALL.s1_3_scenes + 1) // 2, SMALL.s1_3_scenes // 2
    for name, scenes in (("objects", objects), ("grounding", objects), ("groups", groups)):
        rows = _jsonl(demo.root / "s1_3" / f"{name}.jsonl")
        assert demo.counts["s1.3"][name] == len(rows) >= scenes
        per_image: dict[str, int] = {}
        for row in rows:
            humans = [t["value"] for t in row["conversations"][0::2]]
            assert humans[0].startswith("<image>\n") and not any("<image>" in h for h in humans[1:])
            per_image[row["image"]] = per_image.get(row["image"], 0) + len(humans)
        assert len(per_image) == scenes and min(per_image.values()) >= 1
    for stage, size in (("s1.1", SMALL.s1_1), ("s1.2", SMALL.s1_2)):
        assert demo.counts[stage]["digits"] == size // 4


# ---------------------------------------------------------------------------------------------------- ground truth
def _check_scene_truth(truth: dict, image: Image.Image) -> None:
    w, h = truth["width"], truth["height"]
    assert image.size == (w, h)
    assert truth["count"] == len(truth["objects"]) >= 1
    assert len({(o["colour"], o["shape"]) for o in truth["objects"]}) == truth["count"]
    boxes = [o["box"] for o in truth["objects"]] + ([truth["word_box"]] if truth["word"] else [])
    for o in truth["objects"]:
        x1, y1, x2, y2 = o["box"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and x2 - x1 == y2 - y1
        assert o["box_1000"] == list(normalise_box(tuple(o["box"]), w, h))
        assert all(0 <= v <= 1000 for v in o["box_1000"])
        assert o["position"] == position_of(tuple(o["box"]), w, h)
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            p, q = boxes[a], boxes[b]
            assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1], "boxes overlap"


def test_eval_answers_follow_from_the_ground_truth(demo):
    truth = {t["image"]: t for t in _jsonl(demo.eval_dir / "_ground_truth.jsonl")}
    for image, t in truth.items():
        _check_scene_truth(t, Image.open(demo.eval_dir / image))
    ids = set()
    for task in EVAL_TASKS:
        for row in _jsonl(demo.eval_files[task]):
            assert row["task"] == task and row["id"] not in ids and (demo.eval_dir / row["image"]).is_file()
            ids.add(row["id"])
            if task == "digit":
                assert row["question"] == QUESTIONS["digit"][0]
                assert row["answer"] == str(digit_label(row["digit_index"]))
                continue
            t = truth[row["image"]]
            objects = t["objects"]
            assert task in SCENE_KINDS[t["kind"]]
            assert t["kind"] == "group" or len(objects) == 1
            if task == "count":
                assert row["question"] == QUESTIONS["count"][0] and row["answer"] == str(len(objects))
            elif task == "colour":
                shape = re.fullmatch(r"What colour is the (\w+)\?", row["question"]).group(1)
                (match,) = [o for o in objects if o["shape"] == shape]
                assert row["answer"] == match["colour"]
            elif task == "shape":
                colour = re.fullmatch(r"What shape is the (\w+) object\?", row["question"]).group(1)
                (match,) = [o for o in objects if o["colour"] == colour]
                assert row["answer"] == match["shape"]
            elif task == "grounding":
                ref, box = parse_grounding(row["answer"])
                assert row["question"] == f"Where is the {ref}?" and list(box) == row["box"]
                assert row["answer"] == grounding_answer(ref, box)
                (match,) = [o for o in objects if f"{o['colour']} {o['shape']}" == ref]
                assert match["box_1000"] == row["box"]
            elif task == "ocr":
                assert t["word"] is not None and row["answer"] == t["word"]
            elif task == "caption":
                assert row["answer"].startswith(f"There {'is' if len(objects) == 1 else 'are'} {len(objects)} shape")


def test_training_answers_follow_from_the_ground_truth(demo):
    folder = demo.root / "s1_3"
    truth = {t["image"]: t for t in _jsonl(folder / "_ground_truth.jsonl")}
    assert len(truth) == SMALL.s1_3_scenes
    for image, t in truth.items():
        _check_scene_truth(t, Image.open(folder / "images" / image))
    seen = {"grounding": 0, "count": 0, "ocr": 0}
    for row in _jsonl(folder / "objects.jsonl") + _jsonl(folder / "grounding.jsonl") + _jsonl(folder / "groups.jsonl"):
        t = truth[row["image"]]
        turns = row["conversations"]
        for question, answer in zip((x["value"].removeprefix("<image>\n") for x in turns[0::2]),
                                    (x["value"] for x in turns[1::2])):
            grounded = parse_grounding(answer)
            if grounded is not None:
                ref, box = grounded
                (match,) = [o for o in t["objects"] if f"{o['colour']} {o['shape']}" == ref]
                assert match["box_1000"] == list(box) and ref in question
                seen["grounding"] += 1
            elif question in QUESTIONS["count"]:
                assert answer == str(t["count"])
                seen["count"] += 1
            elif question in QUESTIONS["ocr"]:
                assert answer == t["word"]
                seen["ocr"] += 1
    assert seen["grounding"] == (SMALL.s1_3_scenes + 1) // 2 and seen["count"] == SMALL.s1_3_scenes // 2
    records = _shard_records(demo.stages["s1.2"].path)
    digits = [r for r in records if "digit" in r["meta"]]
    assert len(digits) == SMALL.s1_2 // 4
    for record in digits:
        assert record["meta"]["digit_index"] < DIGITS_HELD_OUT_START
        assert record["caption"] == f"A handwritten digit {record['meta']['digit']} on white paper."
        assert record["meta"]["digit"] == digit_label(record["meta"]["digit_index"])
    for record in records:
        if "digit" in record["meta"]:
            continue
        scene = record["meta"]["scene"]
        _check_scene_truth(scene, Image.open(io.BytesIO(record["image"])))
        for o in scene["objects"]:
            assert f"a {o['size']} {o['colour']} {o['shape']}" in record["caption"]
        assert len(NAMES.findall(record["caption"])) == scene["count"]
        assert (f'"{scene["word"]}"' in record["caption"]) == (scene["word"] is not None)


def test_rendered_pixels_match_the_boxes():
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 30:
        scene = sample_scene(rng)
        if scene.noise_seed is not None:
            continue
        pixels = np.asarray(render_scene(scene)).astype(int)
        inside = np.zeros(pixels.shape[:2], bool)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            inside[y1:y2, x1:x2] = True
            assert (pixels[(y1 + y2) // 2, (x1 + x2) // 2] == obj.rgb).all()  # every shape covers its centre
            region = pixels[y1:y2, x1:x2]
            filled = (region == obj.rgb).all(-1)
            # The drawing reaches every edge of its box (a triangle's apex and base, a cross's arms).
            assert filled[0].any() and filled[-1].any() and filled[:, 0].any() and filled[:, -1].any()
        if scene.word is not None:
            x1, y1, x2, y2 = scene.word_box
            inside[y1:y2, x1:x2] = True
            ink = (pixels[y1:y2, x1:x2] == scene.word_rgb).all(-1)
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
        assert (pixels[~inside] == scene.background).all()
        checked += 1


def test_grounding_format_round_trips():
    assert grounding_answer("red circle", (1, 20, 300, 1000)) == "<ref>red circle</ref><box>[[1, 20, 300, 1000]]</box>"
    assert parse_grounding("It is <ref>red circle</ref><box>[[1,20,300,1000]]</box>.") == ("red circle",
                                                                                          (1, 20, 300, 1000))
    assert parse_grounding("<ref>red circle</ref> somewhere") is None


# ---------------------------------------------------------------------------------------------------- held out
def test_digit_splits_partition_the_digits():
    train, held_out = set(digit_indices("train").tolist()), set(digit_indices("held_out").tolist())
    assert not train & held_out and train | held_out == set(range(1797))
    assert min(held_out) == DIGITS_HELD_OUT_START and len(held_out) == 297
    assert {digit_label(i) for i in held_out} == set(range(10))


def test_held_out_digits_and_scenes_never_reach_training(demo):
    digit_files = (demo.root / "s1_3" / "digit.jsonl", demo.root / "s2" / "digits.jsonl")
    train_indices = [r["digit_index"] for path in digit_files for r in _jsonl(path)]
    eval_indices = [r["digit_index"] for r in _jsonl(demo.eval_files["digit"])]
    assert len(train_indices) == SMALL.s1_3_digits + SMALL.s2_digits
    train_indices += [r["meta"]["digit_index"] for stage in ("s1.1", "s1.2")
                      for r in _shard_records(demo.stages[stage].path) if "digit" in r["meta"]]
    assert max(train_indices) < DIGITS_HELD_OUT_START <= min(eval_indices)
    for path in (demo.root / "s1_3" / "digit.jsonl",):
        for r in _jsonl(path):
            assert r["conversations"][1]["value"] == str(digit_label(r["digit_index"]))
    train_images = {hashlib.sha256(p.read_bytes()).digest()
                    for stage in ("s1_3_shapes", "s1_3", "s2") for p in (demo.root / stage / "images").iterdir()}
    train_images |= {hashlib.sha256(r["image"]).digest() for s in ("s1.1", "s1.2")
                     for r in _shard_records(demo.stages[s].path)}
    eval_images = {hashlib.sha256(p.read_bytes()).digest() for p in (demo.eval_dir / "images").iterdir()}
    assert eval_images and not eval_images & train_images
    train_truth = [json.dumps(t["objects"]) for stage in ("s1_3_shapes", "s1_3", "s2")
                   for t in _jsonl(demo.root / stage / "_ground_truth.jsonl")]
    assert not {json.dumps(t["objects"]) for t in _jsonl(demo.eval_dir / "_ground_truth.jsonl")} & set(train_truth)


# ---------------------------------------------------------------------------------------------------- captions
@pytest.mark.parametrize("share", [0.2, 0.5])
def test_noisy_captions_are_the_stated_share_and_really_wrong(tmp_path, demo, share):
    data = demo if share == 0.2 else write_demo_data(tmp_path / "noisy", seed=3, sizes=SMALL, noise_share=share)
    records = _shard_records(data.stages["s1.1"].path)
    kinds = [r["meta"]["caption_kind"] for r in records]
    noisy = round(share * SMALL.s1_1)
    assert len(records) == SMALL.s1_1 and len(kinds) - kinds.count("accurate") == noisy
    assert data.counts["s1.1"] == {"samples": SMALL.s1_1, "digits": SMALL.s1_1 // 4, "accurate": SMALL.s1_1 - noisy,
                                   "wrong": (noisy + 1) // 2, "irrelevant": noisy // 2}
    assert json.loads(data.manifest.read_text())["noisy_captions"] == noisy
    for record in records:
        if "digit" in record["meta"]:  # a digit: accurate names it, wrong names another one
            label, caption, kind = record["meta"]["digit"], record["caption"], record["meta"]["caption_kind"]
            said = re.findall(r"\b\d\b", caption)
            if kind == "accurate":
                assert said == [str(label)]
            elif kind == "wrong":
                assert said and said != [str(label)]
            continue
        scene, caption = record["meta"]["scene"], record["caption"]
        present = {f"{o['colour']} {o['shape']}" for o in scene["objects"]}
        named = {" ".join(m) for m in NAMES.findall(caption)}
        count = re.search(r"(\d+) shapes", caption)
        kind = record["meta"]["caption_kind"]
        if kind == "accurate":
            assert named <= present and (count is None or int(count.group(1)) == scene["count"])
            assert named or count or scene["word"] in caption
        elif kind == "wrong":
            assert (named and not named & present) or (count and int(count.group(1)) != scene["count"])
        else:
            assert not named and not any(word in caption for word in (*COLOURS, *SHAPES))


def test_text_corpus_is_seeded_scene_text():
    corpus = text_corpus(40, seed=0)
    assert corpus == text_corpus(40, seed=0) != text_corpus(40, seed=1)
    assert len(corpus) == 40 and all(NAMES.search(text) for text in corpus)


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _given_away(answer: str, earlier: str) -> bool:
    words = re.findall(r"[a-z0-9]+", earlier.lower())
    key = answer.lower()
    return key in words or (key.isdigit() and int(key) < 10 and _NUMBER_WORDS[int(key)] in words)


def test_no_answer_is_given_away_by_an_earlier_turn(demo):
    # "What colour is the square?" then "Which shape is purple?" in one sample teaches copying "square" from the
    # text; a caption ("There are 3 shapes ...") before "How many shapes are there?" the same for counting.
    checked = 0
    for path in [demo.root / "s1_3" / "objects.jsonl", demo.root / "s1_3" / "grounding.jsonl",
                 demo.root / "s1_3" / "groups.jsonl",
                 demo.root / "s2" / "scenes.jsonl"]:
        for row in _jsonl(path):
            turns = [t["value"] for t in row["conversations"]]
            for k in range(1, len(turns), 2):
                if len(turns[k].split()) == 1:
                    assert not _given_away(turns[k], " ".join(turns[:k])), (path.name, row["id"], turns)
                    checked += 1
    assert checked > 0


def test_object_scenes_are_single_tile_close_ups(demo):
    for stage in ("s1_3_shapes", "s1_3", "s2", "eval"):
        truths = _jsonl(demo.root / stage / "_ground_truth.jsonl")
        objects = [t for t in truths if t["kind"] == "object"]
        assert objects and all(t["aspect"] == "1:1" and t["count"] == 1 for t in objects)
        if stage != "s1_3_shapes":  # the shape phase has close-ups only
            assert {t["aspect"] for t in truths if t["kind"] == "group"} > {"1:1"}  # groups keep every aspect ratio


def test_the_shape_phase_asks_each_close_up_its_shape_alone(demo):
    folder = demo.root / "s1_3_shapes"
    truths, rows = _jsonl(folder / "_ground_truth.jsonl"), _jsonl(folder / "shapes.jsonl")
    assert len(truths) == len(rows) == SMALL.s1_3_shapes == demo.stages["s1.3-shapes"].samples
    forms = {f.format(colour=c): c for f in QUESTIONS["shape"] for c in COLOURS}
    asked = set()
    for row, truth in zip(rows, truths):
        (obj,) = truth["objects"]
        assert row["image"] == truth["image"] and (folder / "images" / row["image"]).is_file()
        question, answer = (t["value"] for t in row["conversations"])
        assert len(row["conversations"]) == 2 and question.startswith("<image>\n")
        assert forms[question.removeprefix("<image>\n")] == obj["colour"] and answer == obj["shape"]
        asked.add(answer)
    assert asked == set(SHAPES)


def test_s1_3_one_word_answers_stand_alone_or_lead(demo):
    # S1.3 weights a sample by the square root of its supervised tokens, so a one-word shape or colour answer sits
    # alone (a box in the same sample would take most of its weight); the count leads its group-scene sample and a
    # caption, which states the count and the word, comes last.
    truth = {t["image"]: t for t in _jsonl(demo.root / "s1_3" / "_ground_truth.jsonl")}
    leads = {"shape": 0, "colour": 0}
    for name in ("objects", "grounding"):  # one-word answers alone in objects.jsonl, boxes in grounding.jsonl
        for row in _jsonl(demo.root / "s1_3" / f"{name}.jsonl"):
            questions = [t["value"].removeprefix("<image>\n") for t in row["conversations"][0::2]]
            kinds = [next(k for k, forms in QUESTIONS.items() if any(re.fullmatch(re.escape(f).replace(
                r"\{shape\}", r"\w+").replace(r"\{colour\}", r"\w+").replace(r"\{ref\}", r"\w+ \w+"), q)
                for f in forms)) for q in questions]
            if name == "objects":
                assert kinds[0] in leads and kinds == kinds[:1], (row["id"], kinds)
                leads[kinds[0]] += 1
            else:
                assert sorted(kinds) in (["grounding"], ["grounding", "ocr"]), (row["id"], kinds)
    scenes = (SMALL.s1_3_scenes + 1) // 2
    assert leads["shape"] + leads["colour"] == scenes and leads["shape"] > leads["colour"]
    for row in _jsonl(demo.root / "s1_3" / "groups.jsonl"):
        turns = row["conversations"]
        assert turns[0]["value"].removeprefix("<image>\n") in QUESTIONS["count"]
        assert turns[1]["value"] == str(truth[row["image"]]["count"])
        assert all(not t["value"].startswith("There ") for t in turns[1:-1:2])  # a caption only as the last answer
