"""Data sources: random access to the raw samples of one dataset (webdataset shards, JSONL, InternVL meta JSON).

A source indexes its files once, at construction (tar headers, or the byte offsets of JSONL lines), and then
reads sample ``i`` on demand with :meth:`Source.get`, which returns a :class:`~evip.data.types.RawSample` or raises
:class:`~evip.data.types.SkipSample` (``malformed_json``, ``missing_image`` or ``bad_conversation``) for a bad
record; a bad record never raises anything else. Decoding images and tokenizing is the preprocessor's job.

Problems that are not one sample's fault (a truncated shard, an unreadable tar) do not stop indexing: what can be
read is indexed and each problem is appended to ``Source.problems``, which the offline checker reports.

Files are opened lazily and per process: dataloader workers are forked from a process that may already hold
open handles, so every read checks ``os.getpid()`` and reopens after a fork (reads use ``os.pread``, which does
not move a shared file offset either). Sources pickle without their handles, for ``spawn`` workers too.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import tarfile
from array import array
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

from ..job import DatasetConfig
from .types import ImageRef, RawSample, SkipSample

__all__ = [
    "IMAGE_EXTENSIONS",
    "JsonlSource",
    "META_KEYS",
    "Source",
    "WebDatasetSource",
    "build_sources",
    "meta_sources",
    "parse_conversation",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
"""Shard member extensions read as the sample's image, in order of preference."""

META_KEYS = ("root", "annotation", "repeat_time", "max_dynamic_patch", "data_augment", "length")
"""Keys an InternVL meta JSON entry may have (``root`` and ``annotation`` are required)."""

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class _Files:
    """Open read-only file descriptors of one process, at most ``max_open`` of them (least recently used closed).

    After a fork the parent's descriptors are dropped unused: the child opens its own.
    """

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._pid = os.getpid()
        self._fds: OrderedDict[str, int] = OrderedDict()

    def pread(self, path: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``path`` at ``offset`` (fewer if the file is shorter)."""
        if os.getpid() != self._pid:
            # A forked copy: these descriptors are the parent's duplicates; closing them here leaves the
            # parent's untouched, and this process gets its own.
            self.close()
            self._pid = os.getpid()
        fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        return os.pread(fd, size, offset)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])

    def __del__(self) -> None:
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:  # interpreter shutdown: os may already be gone, and the OS closes descriptors anyway
            pass


class Source:
    """One dataset, indexed: ``len(source)`` samples, read by position with :meth:`get`.

    Attributes:
        name: the dataset's name in logs and reports.
        kind: ``pair`` or ``conversation``: the kind of the dataset's first sample (each
            :class:`RawSample` carries its own kind, which is what counts).
        max_tiles: dynamic-tiling cap of this dataset's samples.
        augment: whether the random JPEG re-encode applies to its images.
        repeat: times each sample is used per epoch (a fraction below 1 takes the first share of the samples);
            not applied by the source: ``len`` counts every indexed sample once.
        problems: what went wrong while indexing (truncated shards, unreadable files), one line each.
    """

    name: str
    kind: str
    max_tiles: int
    augment: bool
    repeat: float
    problems: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> RawSample:
        """Sample ``i`` (``0 <= i < len(self)``), or :class:`SkipSample` if its record is bad."""
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for dataset {self.name!r} of {len(self)} samples")
        return int(i)

    def _sample(self, sample_id: str, kind: str, i: int, **fields: Any) -> RawSample:
        return RawSample(
            sample_id=sample_id, dataset=self.name, kind=kind, max_tiles=self.max_tiles, augment=self.augment,
            index=i, **fields,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, samples={len(self)}, kind={self.kind!r}, "
            f"max_tiles={self.max_tiles}, augment={self.augment}, repeat={self.repeat}, problems={len(self.problems)})"
        )


def parse_conversation(turns: Any, sample_id: str) -> list[tuple[str, str]]:
    """LLaVA ``conversations`` (``[{"from": ..., "value": ...}, ...]``) as ``[(role, text), ...]``.

    Roles ``human``/``user`` become ``user``, ``gpt``/``assistant`` become ``assistant``; a first ``system`` turn is
    kept as ``("system", text)`` (it replaces the template's system message). Alternation, empty answers and
    placeholders are the preprocessor's checks.

    Raises:
        SkipSample: ``malformed_json`` when the structure is wrong, ``bad_conversation`` for an unknown role or a
            system turn that is not first.
    """
    if not isinstance(turns, list) or not turns:
        raise SkipSample("malformed_json", sample_id, "'conversations' must be a non-empty list of turns")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SkipSample(
                "malformed_json", sample_id, f"conversations[{j}] is not an object with 'from' and 'value'"
            )
        value = turn["value"]
        if not isinstance(value, str):
            raise SkipSample(
                "malformed_json", sample_id, f"conversations[{j}].value must be a string, got {type(value).__name__}"
            )
        role = _ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise SkipSample(
                "bad_conversation", sample_id,
                f"conversations[{j}] has role {turn['from']!r}; expected human/gpt (or user/assistant, system first)",
            )
        if role == "system" and j != 0:
            raise SkipSample(
                "bad_conversation", sample_id, f"conversations[{j}] is a system turn; only the first turn may be"
            )
        out.append((role, value))
    return out


def _caption_of(record: dict, sample_id: str) -> str:
    for key in ("caption", "text"):
        if key in record:
            if not isinstance(record[key], str):
                got = type(record[key]).__name__
                raise SkipSample("malformed_json", sample_id, f"'{key}' must be a string, got {got}")
            return record[key]
    raise SkipSample("malformed_json", sample_id, "the record has neither 'conversations' nor 'caption'/'text'")


# ---------------------------------------------------------------------------------------------------- webdataset
def _shard_paths(path: Path) -> list[Path]:
    """The shards named by ``path``: a ``.tar`` file, a folder of ``*.tar`` files, or a glob pattern."""
    text = str(path)
    if any(c in text for c in "*?["):
        return sorted(Path(p) for p in glob.glob(text) if p.endswith(".tar") and os.path.isfile(p))
    if path.is_dir():
        return sorted(p for p in path.glob("*.tar") if p.is_file())
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"webdataset path '{path}' does not exist; give a .tar shard, a folder of shards or a glob")


def _split_member(name: str) -> tuple[str, str]:
    """``(key, extension)`` by the webdataset rule: the extension starts at the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


class WebDatasetSource(Source):
    """Samples of tar shards: members grouped by key, an image member plus a ``txt`` caption or a ``json`` record.

    A ``json`` member may hold ``conversations`` (LLaVA turns; the image member, if any, is the sample's image) or
    ``caption``/``text``; it wins over a ``txt`` member. Sample ids are ``"<shard file name>:<key>"``.
    """

    def __init__(
        self, path: str | Path, *, name: Optional[str] = None, max_tiles: int = 6, augment: bool = False,
        repeat: float = 1.0,
    ) -> None:
        self.shards = [str(p) for p in _shard_paths(Path(path))]
        if not self.shards:
            raise FileNotFoundError(f"no .tar shards found at '{path}'")
        self.name = name or Path(path).name
        self.max_tiles, self.augment, self.repeat = max_tiles, augment, repeat
        self.problems: list[str] = []
        # One entry per sample: (shard index, key, ((extension, data offset, size), ...)); only the members
        # this source reads are kept.
        self._entries: list[tuple[int, str, tuple[tuple[str, int, int], ...]]] = []
        for shard_index, shard in enumerate(self.shards):
            self._index_shard(shard_index, shard)
        self._files = _Files()
        self.kind = self._first_kind()

    def _index_shard(self, shard_index: int, shard: str) -> None:
        shard_name = os.path.basename(shard)
        size = os.path.getsize(shard)
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            tf = tarfile.open(shard, mode="r:")
        except (tarfile.TarError, OSError) as exc:
            self.problems.append(f"{shard}: not a readable tar file ({exc}); shard skipped")
            return
        with tf:
            while True:
                try:
                    member = tf.next()
                except (tarfile.TarError, OSError) as exc:
                    self.problems.append(
                        f"{shard}: unreadable after byte {tf.offset} of {size} ({exc}); the members before it are used"
                    )
                    break
                if member is None:
                    self._check_tail(shard, tf.offset, size)
                    break
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    self.problems.append(
                        f"{shard}: member '{member.name}' is truncated ({member.size} bytes declared at byte "
                        f"{member.offset_data}, file has {size}); member dropped"
                    )
                    break
                key, ext = _split_member(member.name)
                if ext in IMAGE_EXTENSIONS or ext in ("txt", "json"):
                    members = groups.setdefault(key, {})
                    if ext in members:
                        self.problems.append(f"{shard_name}:{key}: duplicate member '{member.name}' ignored")
                    else:
                        members[ext] = (member.offset_data, member.size)
        for key, members in groups.items():
            self._entries.append(
                (shard_index, key, tuple((ext, off, n) for ext, (off, n) in members.items()))
            )

    def _check_tail(self, shard: str, offset: int, size: int) -> None:
        # tarfile stops quietly at a corrupt header in the middle of a shard, as if the archive ended there; a
        # real end is followed only by zero blocks, so any data after it means members were lost.
        with open(shard, "rb") as f:
            f.seek(offset)
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    return
                if chunk.count(0) != len(chunk):
                    self.problems.append(
                        f"{shard}: invalid tar header at byte {offset} of {size}; the members after it are lost"
                    )
                    return

    def _first_kind(self) -> str:
        if self._entries and any(ext == "json" for ext, _, _ in self._entries[0][2]):
            try:
                record = json.loads(self._read(0, "json"))
            except ValueError:  # a bad first record is get()'s to report
                return "pair"
            if isinstance(record, dict) and "conversations" in record:
                return "conversation"
        return "pair"

    def __len__(self) -> int:
        return len(self._entries)

    def _read(self, i: int, ext: str) -> bytes:
        shard_index, _, members = self._entries[i]
        for e, off, n in members:
            if e == ext:
                return self._files.pread(self.shards[shard_index], off, n)
        raise KeyError(ext)

    def sample_id(self, i: int) -> str:
        shard_index, key, _ = self._entries[i]
        return f"{os.path.basename(self.shards[shard_index])}:{key}"

    def get(self, i: int) -> RawSample:
        i = self._check_index(i)
        sid = self.sample_id(i)
        exts = [e for e, _, _ in self._entries[i][2]]
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in exts), None)
        if "json" not in exts and "txt" not in exts:
            raise SkipSample("malformed_json", sid, "no .txt or .json member with the caption")
        images = [ImageRef(data=self._read(i, image_ext))] if image_ext else []
        record = None
        if "json" in exts:
            try:
                record = json.loads(self._read(i, "json").decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise SkipSample("malformed_json", sid, f"the .json member does not parse: {exc}") from None
            if not isinstance(record, dict):
                raise SkipSample("malformed_json", sid, f"the .json member is a {type(record).__name__}, not an object")
        if record is not None and "conversations" in record:
            conversation = parse_conversation(record["conversations"], sid)
            if not images and any("<image>" in text for _, text in conversation):
                raise SkipSample("missing_image", sid, "the conversation has <image> but the key has no image member")
            return self._sample(sid, "conversation", i, images=images, conversation=conversation)
        if not images:
            raise SkipSample("missing_image", sid, f"no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        if "txt" in exts and not (record is not None and ("caption" in record or "text" in record)):
            try:
                # A .txt member is a file: its trailing newline is not part of the caption.
                caption = self._read(i, "txt").decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise SkipSample("malformed_json", sid, f"the .txt member is not UTF-8: {exc}") from None
        else:
            caption = _caption_of(record, sid)
        return self._sample(sid, "pair", i, images=images, caption=caption)


# ---------------------------------------------------------------------------------------------------- JSONL
class JsonlSource(Source):
    """Samples of a JSONL file, one JSON object per non-blank line; sample ids are ``"<file name>:<line>"``.

    A line with ``conversations`` is a LLaVA conversation (``image`` a path, a list of paths, or absent for
    text-only); otherwise it is a pair with ``image`` and ``caption`` (or ``text``). Relative image paths are
    resolved against ``image_root`` (default: the JSONL file's folder); a missing file is ``missing_image``.
    """

    def __init__(
        self, path: str | Path, *, image_root: str | Path | None = None, name: Optional[str] = None,
        max_tiles: int = 6, augment: bool = False, repeat: float = 1.0,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"JSONL file '{path}' does not exist")
        self.path = str(path)
        self.image_root = str(image_root) if image_root is not None else str(path.parent)
        if not os.path.isdir(self.image_root):
            raise FileNotFoundError(f"image root '{self.image_root}' of '{path}' is not a folder")
        self.name = name or path.name
        self.max_tiles, self.augment, self.repeat = max_tiles, augment, repeat
        self.problems: list[str] = []
        # Compact index (8 + 8 + 8 bytes a line): start offset, byte length and 1-based line number.
        self._offsets, self._lengths, self._lines = array("q"), array("q"), array("q")
        offset = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    self._offsets.append(offset)
                    self._lengths.append(len(line))
                    self._lines.append(lineno)
                offset += len(line)
        if not self._offsets:
            self.problems.append(f"{path}: no samples (the file has no non-blank lines)")
        self._files = _Files()
        self.kind = self._first_kind()

    def _first_kind(self) -> str:
        if len(self):
            try:
                record = json.loads(self._line(0))
                if isinstance(record, dict) and "conversations" in record:
                    return "conversation"
            except ValueError:
                pass
        return "pair"

    def __len__(self) -> int:
        return len(self._offsets)

    def _line(self, i: int) -> bytes:
        return self._files.pread(self.path, self._offsets[i], self._lengths[i])

    def sample_id(self, i: int) -> str:
        return f"{os.path.basename(self.path)}:{self._lines[i]}"

    def _image(self, value: Any, sid: str, field: str) -> ImageRef:
        if not isinstance(value, str) or not value:
            raise SkipSample("malformed_json", sid, f"'{field}' must be a non-empty path string, got {value!r}")
        path = os.path.join(self.image_root, value)  # an absolute value stays as it is
        if not os.path.isfile(path):
            raise SkipSample("missing_image", sid, f"image file '{path}' does not exist")
        return ImageRef(path=path)

    def get(self, i: int) -> RawSample:
        i = self._check_index(i)
        sid = self.sample_id(i)
        try:
            record = json.loads(self._line(i).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SkipSample("malformed_json", sid, f"the line does not parse as JSON: {exc}") from None
        if not isinstance(record, dict):
            raise SkipSample("malformed_json", sid, f"the line is a JSON {type(record).__name__}, not an object")
        value = record.get("image")
        if "conversations" in record:
            conversation = parse_conversation(record["conversations"], sid)
            if value is None:
                images = []
            elif isinstance(value, list):
                images = [self._image(v, sid, f"image[{k}]") for k, v in enumerate(value)]
            else:
                images = [self._image(value, sid, "image")]
            return self._sample(sid, "conversation", i, images=images, conversation=conversation)
        if value is None:
            raise SkipSample("malformed_json", sid, "a pair needs 'image' (or give 'conversations')")
        if isinstance(value, list):
            if len(value) != 1:
                raise SkipSample("malformed_json", sid, f"a pair has exactly one image, got a list of {len(value)}")
            value = value[0]
        caption = _caption_of(record, sid)
        return self._sample(sid, "pair", i, images=[self._image(value, sid, "image")], caption=caption)


# ---------------------------------------------------------------------------------------------------- meta JSON
def _resolve(value: Any, meta: Path, entry: str, key: str) -> Path:
    """A meta path: absolute as is; relative against the meta file's folder if it exists there, else the CWD."""
    if not isinstance(value, str):
        raise ValueError(f"meta file '{meta}', entry '{entry}': '{key}' must be a path string, got {value!r}")
    if "://" in value:
        raise ValueError(
            f"meta file '{meta}', entry '{entry}': '{key}' is a URL ({value}); only local paths are supported "
            "(mount the bucket or copy the data)"
        )
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [meta.parent / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = " or ".join(f"'{c}'" for c in candidates)
    raise FileNotFoundError(f"meta file '{meta}', entry '{entry}': {key} '{value}' not found (looked for {tried})")


def meta_sources(
    path: str | Path, *, default_max_tiles: int, augment: bool = False, repeat: float = 1.0
) -> list[JsonlSource]:
    """One :class:`JsonlSource` per entry of an InternVL meta JSON (``{name: {"root": ..., "annotation": ...}}``).

    ``root`` becomes the image root and the key the dataset name; ``repeat_time`` (times ``repeat``),
    ``max_dynamic_patch`` (default ``default_max_tiles``) and ``data_augment`` (default ``augment``) are taken
    per entry; ``length`` is informational. Relative ``root``/``annotation`` paths are resolved against the meta
    file's folder when they exist there, else against the current working directory (InternVL's meta files are
    written relative to the directory training starts in).

    Raises:
        ValueError: the file is not a JSON object of objects, an entry has an unknown key, lacks ``root`` or
            ``annotation``, or has a value of the wrong type (the message names the file and the entry).
        FileNotFoundError: the meta file, an annotation file or an image root does not exist.
    """
    meta = Path(path)
    if not meta.is_file():
        raise FileNotFoundError(f"meta file '{meta}' does not exist")
    try:
        entries = json.loads(meta.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"meta file '{meta}' is not valid JSON: {exc}") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"meta file '{meta}' must be a non-empty JSON object of {{dataset name: entry}}")
    sources = []
    for entry, spec in entries.items():
        where = f"meta file '{meta}', entry '{entry}'"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: must be an object with 'root' and 'annotation', got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(META_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(META_KEYS)}")
        missing = [k for k in ("root", "annotation") if k not in spec]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}")
        repeat_time = spec.get("repeat_time", 1)
        if isinstance(repeat_time, bool) or not isinstance(repeat_time, (int, float)) or repeat_time <= 0:
            raise ValueError(f"{where}: 'repeat_time' must be a positive number, got {repeat_time!r}")
        max_tiles = spec.get("max_dynamic_patch", default_max_tiles)
        if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
            raise ValueError(f"{where}: 'max_dynamic_patch' must be a positive integer, got {max_tiles!r}")
        data_augment = spec.get("data_augment", augment)
        if not isinstance(data_augment, bool):
            raise ValueError(f"{where}: 'data_augment' must be true or false, got {data_augment!r}")
        annotation = _resolve(spec["annotation"], meta, entry, "annotation")
        root = _resolve(spec["root"], meta, entry, "root")
        sources.append(
            JsonlSource(
                annotation, image_root=root, name=entry, max_tiles=max_tiles, augment=data_augment,
                repeat=float(repeat_time) * repeat,
            )
        )
    return sources


# ---------------------------------------------------------------------------------------------------- config
def build_sources(datasets: Sequence[DatasetConfig], default_max_tiles: int) -> list[Source]:
    """The sources of a data mixture, in order (a meta JSON contributes one source per entry).

    ``DatasetConfig.max_tiles`` defaults to ``default_max_tiles``; a meta entry's ``max_dynamic_patch`` wins over
    both, and its ``repeat_time`` multiplies ``DatasetConfig.repeat``.

    Raises:
        FileNotFoundError / ValueError: a path that does not exist, no shards, a bad meta file or setting; the
            message starts with ``data.datasets[i] (path)``.
    """
    sources: list[Source] = []
    for i, cfg in enumerate(datasets):
        where = f"data.datasets[{i}] ({cfg.path})"
        try:
            max_tiles = cfg.max_tiles if cfg.max_tiles is not None else default_max_tiles
            if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
                raise ValueError(f"max_tiles must be a positive integer, got {max_tiles!r}")
            if not cfg.repeat > 0:
                raise ValueError(f"repeat must be positive, got {cfg.repeat!r}")
            common = dict(max_tiles=max_tiles, augment=cfg.augment, repeat=float(cfg.repeat))
            if cfg.format == "webdataset":
                sources.append(WebDatasetSource(cfg.path, name=cfg.name, **common))
            elif cfg.format == "jsonl":
                sources.append(JsonlSource(cfg.path, image_root=cfg.image_root, name=cfg.name, **common))
            elif cfg.format == "meta":
                if cfg.image_root is not None or cfg.name is not None:
                    raise ValueError("a meta JSON names its datasets and image roots itself; drop name/image_root")
                sources.extend(
                    meta_sources(cfg.path, default_max_tiles=max_tiles, augment=cfg.augment, repeat=float(cfg.repeat))
                )
            else:
                raise ValueError(f"unknown format {cfg.format!r}; expected webdataset, jsonl or meta")
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from exc
    return sources
