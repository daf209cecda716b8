"""The QA contract of both stages: how QA files are read, which video a row names, its clip id, and
how its conversation is parsed. `index` (stage 1) and the training join (stage 2) both use this
module, so every row that `index` accepts joins to the clip it was indexed under.

Files (`read_rows`, a stream: no file is held whole, except a wrapper written on one line):
- a JSON list of rows: the first non-space character is `[`;
- a JSON object holding the rows in its `"data"` list, over several lines (`{` on a line of its own
  or followed by the start of the list); other keys of the object are skipped;
- otherwise JSON Lines, one row a line (blank lines skipped); a file whose only line is an object
  with a `"data"` list is that wrapper written on one line.
A line that is not valid JSON is one bad row (`QARow.error`); a list or wrapper that is not valid
JSON is a bad file (`QAFileError`): nothing after the damage can be found.

The video of a row (`video_of`), exactly one per row (the student takes one video per sample):
- `"video"` (VSI-590K, LLaVA): a path, or a list holding one path; `"videos"` likewise;
- VLM-3R rows, with `"data_source"` and `"scene_name"` and no `"video"`: `<data_source>/<scene_name>.mp4`,
  with the source `scannetpp` read as `scannetppv2` (GeoVR's `dataset/vlm3r.py` lays the videos out so);
- a row with none of these (an image or text-only row) has no video: `video_of` returns None.
A row naming several videos, or a video that is not a non-empty string, is a bad row (`QARowError`).

The clip of a video (`clip_id_of`): `schema.clip_id_for(normalise_video(video, corpus_root), sampling)`,
where `normalise_video` makes the path relative to the corpus root and normal (POSIX separators, no
`.` or `..` parts): `./videos/a.mp4`, `videos/./a.mp4` and `<root>/videos/a.mp4` are all `videos/a.mp4`.
Absolute paths need the corpus root, and no path may leave it.

Conversations (`parse_turns`, `parse_conversation`, `chat_messages`): LLaVA turns
`{"from": "human"|"gpt"|"system", "value": str}` or chat turns `{"role": "user"|"assistant"|"system",
"content": str}`, one role map (`ROLE_OF`) for both stages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from geovr.teacher_cache.schema import clip_id_for

VIDEO_PLACEHOLDER = "<video>"
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Removed from the first user turn when the video is put in front of it (as GeoVR's data code does).
DROPPED_FROM_PROMPT = ("<image>\n", "<video>\n", "<image>", "<video>", "These are frames of a video.\n")
# VLM-3R's `data_source` names that differ from the folder the videos are in (GeoVR, dataset/vlm3r.py).
VLM3R_SOURCE_FOLDERS = {"scannetpp": "scannetppv2"}

_CHUNK_CHARS = 1 << 20
_DECODER = json.JSONDecoder()


class QAFileError(ValueError):
    """A QA file that cannot be read at all (missing, or a list / wrapper that is not valid JSON)."""


class QARowError(ValueError):
    """One row that cannot be used; the message says why (the caller adds the file and line)."""


@dataclass(frozen=True)
class QARow:
    """One row of a QA file: `number` is the line (JSON Lines) or the 1-based position in the list;
    `value` the parsed row, or None with `error` set when the line is not valid JSON."""

    path: str
    number: int
    value: Any
    error: str | None = None
    in_lines: bool = True

    @property
    def where(self) -> str:
        """`file:line` for JSON Lines, `file row N` for lists."""
        return f"{self.path}:{self.number}" if self.in_lines else f"{self.path} row {self.number}"


# ----------------------------------------------------------------------------------------------
# Reading rows


class _JsonStream:
    """Incremental reading of one JSON document: values are decoded one at a time from a text buffer
    refilled in `_CHUNK_CHARS` pieces, so a list of 600k rows is never held whole."""

    def __init__(self, handle: IO[str], path: Path) -> None:
        self.handle, self.path = handle, path
        self.buffer, self.pos, self.eof = "", 0, False

    def _more(self) -> bool:
        chunk = self.handle.read(_CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        self.buffer = self.buffer[self.pos :] + chunk
        self.pos = 0
        return True

    def fail(self, what: str) -> QAFileError:
        return QAFileError(f"{self.path}: not valid JSON ({what})")

    def peek(self) -> str:
        """The next non-space character ("" at the end), not consumed."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._more():
                return ""

    def expect(self, char: str) -> None:
        found = self.peek()
        if found != char:
            raise self.fail(f"expected {char!r}, found {found or 'the end of the file'!r}")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as err:
                if self._more():
                    continue
                raise self.fail(err.msg) from None
            # A number that ends the buffer may continue in the next chunk.
            if end == len(self.buffer) and not self.eof and self._more():
                continue
            self.pos = end
            return value

    def array(self) -> Iterator[Any]:
        """The elements of the list that starts here, one at a time."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            separator = self.peek()
            self.pos += 1
            if separator == "]":
                return
            if separator != ",":
                raise self.fail(
                    f"expected ',' or ']' in the list, found {separator or 'the end of the file'!r}"
                )

    def wrapped_array(self) -> Iterator[Any]:
        """The elements of the `"data"` list of the object that starts here (other keys skipped)."""
        self.expect("{")
        found = False
        separator = "," if self.peek() != "}" else ""
        while separator == ",":
            key = self.value()
            if not isinstance(key, str):
                raise self.fail("an object key is not a string")
            self.expect(":")
            if key == "data" and self.peek() == "[":
                found = True
                yield from self.array()
            else:
                self.value()
            separator = self.peek()
            self.pos += 1
        if separator == "":
            self.expect("}")
        elif separator != "}":
            raise self.fail(f"expected ',' or '}}' in the object, found {separator!r}")
        if not found:
            raise QAFileError(f"{self.path}: a JSON object without a 'data' list of QA rows")

    def finish(self) -> None:
        if self.peek():
            raise self.fail("extra data after the rows")


def read_rows(path: str | Path) -> Iterator[QARow]:
    """The rows of a QA file in order (see the module docstring for the formats), one at a time."""
    path = Path(path)
    if not path.is_file():
        raise QAFileError(f"QA file {path} does not exist")
    with path.open() as handle:
        first_line = handle.readline()
        head = first_line.lstrip()[:1]
        while not head and first_line:
            first_line = handle.readline()
            head = first_line.lstrip()[:1]
        handle.seek(0)
        if head == "[":
            stream = _JsonStream(handle, path)
            for number, value in enumerate(stream.array(), start=1):
                yield QARow(str(path), number, value, in_lines=False)
            stream.finish()
        elif head == "{" and not _is_json(first_line):
            stream = _JsonStream(handle, path)
            for number, value in enumerate(stream.wrapped_array(), start=1):
                yield QARow(str(path), number, value, in_lines=False)
            stream.finish()
        else:
            yield from _read_lines(handle, path)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _read_lines(handle: IO[str], path: Path) -> Iterator[QARow]:
    """JSON Lines; a file whose only line is a `{"data": [...]}` wrapper yields the wrapped rows."""
    first: QARow | None = None  # held until a second line shows that the file is not a one-line wrapper
    count = 0
    for number, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            row = QARow(str(path), number, json.loads(text))
        except json.JSONDecodeError as err:
            row = QARow(str(path), number, None, f"not valid JSON ({err.msg} at column {err.colno})")
        count += 1
        if count == 1:
            first = row
            continue
        if count == 2 and first is not None:
            yield first
        yield row
    if count != 1 or first is None:
        return
    if isinstance(first.value, dict) and isinstance(first.value.get("data"), list):
        for index, item in enumerate(first.value["data"], start=1):
            yield QARow(str(path), index, item, in_lines=False)
    else:
        yield first


# ----------------------------------------------------------------------------------------------
# The video of a row and its clip


def video_of(row: Any) -> str | None:
    """The one video a row names, as written in the row (see the module docstring), or None.

    Raises `QARowError` for a row that is not an object, names several videos or a bad path.
    """
    if not isinstance(row, dict):
        raise QARowError(f"row is a {type(row).__name__}, not a JSON object")
    for key in ("video", "videos"):
        if key in row:
            return _one_path(row[key], key)
    if "data_source" in row and "scene_name" in row:
        source, scene = row["data_source"], row["scene_name"]
        if not isinstance(source, str) or not source or not isinstance(scene, str) or not scene:
            raise QARowError("VLM-3R row: 'data_source' and 'scene_name' must be non-empty strings")
        return f"{VLM3R_SOURCE_FOLDERS.get(source, source)}/{scene}.mp4"
    return None


def _one_path(value: Any, key: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise QARowError(f"'{key}' names {len(value)} videos; a row may name exactly one")
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise QARowError(f"'{key}' must be a non-empty path (or a list of one)")
    return value


def normalise_video(video: str, corpus_root: str | Path | None) -> str:
    """The corpus-relative POSIX path a clip id is made of (see the module docstring).

    Raises `QARowError` for an absolute path without a corpus root, or a path outside the root.
    """
    path = Path(video)
    if path.is_absolute():
        if corpus_root is None or str(corpus_root) == "":
            raise QARowError(
                f"video {video} is an absolute path; give the corpus root the clips were indexed under"
            )
        root = Path(os.path.normpath(Path(corpus_root).absolute()))
        try:
            path = Path(os.path.normpath(path)).relative_to(root)
        except ValueError:
            raise QARowError(f"video {video} is outside the corpus root {root}") from None
    normal = PurePosixPath(os.path.normpath(path.as_posix()))
    if normal.parts[:1] == ("..",) or str(normal) == ".":
        raise QARowError(f"video {video} is outside the corpus root")
    return str(normal)


def clip_id_of(video: str, sampling: dict[str, Any], corpus_root: str | Path | None = None) -> str:
    """Clip id of a row's video under a sampling policy: `clip_id_for(normalise_video(video), sampling)`."""
    return clip_id_for(normalise_video(video, corpus_root), sampling)


# ----------------------------------------------------------------------------------------------
# Conversations


@dataclass(frozen=True)
class Turn:
    """One conversation turn: role "system", "user" or "assistant"; text with at most one `<video>`."""

    role: str
    text: str


def parse_turns(conversation: Any) -> tuple[Turn, ...]:
    """Turns of a conversation, roles mapped by `ROLE_OF`; no rule on their order. Raises `QARowError`."""
    if not isinstance(conversation, list) or not conversation:
        raise QARowError("'conversations' must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise QARowError(f"turn {i} is not an object")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(speaker, str) or speaker.lower() not in ROLE_OF:
            raise QARowError(f"turn {i} has speaker {speaker!r}; expected one of {', '.join(ROLE_OF)}")
        if not isinstance(text, str):
            raise QARowError(f"turn {i} has no text ('value' must be a string)")
        turns.append(Turn(ROLE_OF[speaker.lower()], text))
    return tuple(turns)


def parse_conversation(conversation: Any) -> tuple[Turn, ...]:
    """A training conversation: `parse_turns` plus the rules below. Raises `QARowError`.

    An optional system turn, then user and assistant turns alternating, starting with the user and
    ending with a non-empty assistant answer; exactly one `<video>` placeholder, in the first user
    turn (prepended there when the row has none, as LLaVA does).
    """
    turns = list(parse_turns(conversation))
    body = turns[1:] if turns[0].role == "system" else turns
    if not body:
        raise QARowError("conversation has no user turn")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise QARowError(f"turn {i} is a {turn.role} turn where a {expected} turn was expected")
    if body[-1].role != "assistant":
        raise QARowError("conversation ends without an assistant answer")
    if any(not t.text.strip() for t in body if t.role == "assistant"):
        raise QARowError("an assistant turn is empty")
    placeholders = sum(t.text.count(VIDEO_PLACEHOLDER) for t in turns)
    if placeholders > 1:
        raise QARowError(f"conversation has {placeholders} {VIDEO_PLACEHOLDER} placeholders; expected one")
    if placeholders == 1 and VIDEO_PLACEHOLDER not in body[0].text:
        raise QARowError(f"the {VIDEO_PLACEHOLDER} placeholder is not in the first user turn")
    if placeholders == 0:
        first = len(turns) - len(body)
        turns[first] = Turn("user", f"{VIDEO_PLACEHOLDER}\n{body[0].text}")
    return tuple(turns)


def chat_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """Chat-template messages: the video as the first item of the first user turn, whose text loses
    the `<image>` / `<video>` placeholders and the "These are frames of a video." line."""
    messages, video_placed = [], False
    for turn in turns:
        if turn.role == "user" and not video_placed:
            text = turn.text
            for piece in DROPPED_FROM_PROMPT:
                text = text.replace(piece, "")
            content = [{"type": "video"}, {"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
            video_placed = True
        else:
            messages.append({"role": turn.role, "content": turn.text})
    if not video_placed:
        raise QARowError("conversation has no user turn to attach the video to")
    return messages
