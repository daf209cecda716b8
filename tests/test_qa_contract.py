"""The QA contract of both stages (`teacher_cache.qa`): file formats, the video of a row, its clip id,
and `index` + precompute + the training join agreeing on every row of a mixed QA file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import write_corpus
from geovr.pipeline.index import build_manifest, read_manifest
from geovr.student.config import DataConfig
from geovr.student.data import join_qa
from geovr.teacher_cache import qa
from geovr.teacher_cache.qa import QAFileError, QARowError, normalise_video, parse_turns, read_rows, video_of
from geovr.teacher_cache.store import open_store
from tests.test_precompute import TINY, fov_fixed_teacher, output, precompute_command, ray_env
from tests.test_train_run import run_cli

CONVERSATION = [{"from": "human", "value": "<image>\nHow many chairs?"}, {"from": "gpt", "value": "2"}]


def _rows(n: int) -> list[dict]:
    return [{"id": f"q{i}", "video": f"v{i}.mp4", "conversations": CONVERSATION} for i in range(n)]


def _read(path: Path) -> list[tuple[str, object]]:
    return [(row.where, row.value["id"] if row.error is None else row.error) for row in read_rows(path)]


def test_every_file_format_reads_to_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(qa, "_CHUNK_CHARS", 16)  # rows span many buffer refills
    rows = _rows(4)
    files = {
        "a.jsonl": "".join(json.dumps(r) + "\n\n" for r in rows),
        "b.json": json.dumps(rows, indent=1),
        "c.json": json.dumps({"version": [1, {"data": 2}], "data": rows, "n": 4}, indent=2),
        "d.json": json.dumps({"data": rows}),  # a wrapper on one line
        "e.txt": "\n".join(json.dumps(r) for r in rows),  # JSON Lines whatever the name
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert [value for _, value in _read(tmp_path / name)] == ["q0", "q1", "q2", "q3"], name
    assert _read(tmp_path / "a.jsonl")[1][0] == f"{tmp_path / 'a.jsonl'}:3"
    assert _read(tmp_path / "b.json")[1][0] == f"{tmp_path / 'b.json'} row 2"

    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n")
    got = _read(tmp_path / "bad.jsonl")
    assert [g[1] for g in got[::2]] == ["q0", "q1"] and got[1][1].startswith("not valid JSON")


def test_lists_are_streamed_row_by_row(tmp_path, monkeypatch):
    """Rows come out before the end of the file is read: damage at the end shows up after them."""
    monkeypatch.setattr(qa, "_CHUNK_CHARS", 64)
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(_rows(50), indent=1)[:-40])
    rows = read_rows(path)
    assert next(rows).value["id"] == "q0"
    with pytest.raises(QAFileError, match=r"cut\.json: not valid JSON"):
        list(rows)
    (tmp_path / "nodata.json").write_text('{\n "rows": []\n}')
    with pytest.raises(QAFileError, match="without a 'data' list"):
        list(read_rows(tmp_path / "nodata.json"))


def test_the_video_of_a_row():
    assert video_of({"video": "scannet/scene0000_00.mp4"}) == "scannet/scene0000_00.mp4"
    assert video_of({"video": ["a.mp4"]}) == video_of({"videos": "a.mp4"}) == "a.mp4"
    assert video_of({"data_source": "scannetpp", "scene_name": "0a5c0134"}) == "scannetppv2/0a5c0134.mp4"
    assert video_of({"data_source": "arkitscenes", "scene_name": "4123"}) == "arkitscenes/4123.mp4"
    assert video_of({"image": "a.jpg", "conversations": []}) is None
    for bad, reason in (
        ({"video": ["a.mp4", "b.mp4"]}, "names 2 videos"),
        ({"video": None}, "non-empty path"),
        ({"data_source": "scannet", "scene_name": 7}, "VLM-3R"),
        (["a.mp4"], "not a JSON object"),
    ):
        with pytest.raises(QARowError, match=reason):
            video_of(bad)


def test_video_paths_normalise_to_one_clip_id():
    root = Path("/data/corpus")
    same = [
        "./videos/scene0.mp4",
        "videos/scene0.mp4",
        "videos/./x/../scene0.mp4",
        "/data/corpus/videos/scene0.mp4",
    ]
    assert {normalise_video(v, root) for v in same} == {"videos/scene0.mp4"}
    assert len({qa.clip_id_of(v, TINY.policy(), root) for v in same}) == 1
    with pytest.raises(QARowError, match="absolute path"):
        normalise_video("/data/corpus/videos/scene0.mp4", None)
    for outside in ("/elsewhere/scene0.mp4", "../scene0.mp4", "."):
        with pytest.raises(QARowError, match="outside the corpus root"):
            normalise_video(outside, root)


def test_one_role_map_for_both_conversation_styles():
    llava = parse_turns([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}])
    chat = parse_turns([{"role": "user", "content": "Q"}, {"role": "Assistant", "content": "A"}])
    assert llava == chat and [t.role for t in chat] == ["user", "assistant"]
    messages = qa.chat_messages(qa.parse_conversation(CONVERSATION))
    assert messages[0]["content"] == [{"type": "video"}, {"type": "text", "text": "How many chairs?"}]


def _mixed_qa(root: Path) -> list[dict]:
    """One row per way of naming a video: ./-prefixed, plain relative, absolute, VLM-3R, `videos`."""
    videos = [
        {"video": "./videos/scene_0000.mp4"},
        {"video": "videos/scene_0001.mp4"},
        {"video": str(root / "videos" / "scene_0002.mp4")},
        {"data_source": "scannetpp", "scene_name": "scene_0003"},
        {"videos": ["videos/./scene_0000.mp4"]},
    ]
    conversation = [{"from": "human", "value": "<video>\nHow many chairs?"}, {"from": "gpt", "value": "2"}]
    return [{"id": f"row{i}", **v, "conversations": conversation} for i, v in enumerate(videos)]


@pytest.mark.slow
def test_index_precompute_and_train_join_every_row(tmp_path, capsys):
    root = tmp_path / "corpus"
    write_corpus(root, SynthConfig(scenes=4, frames=10, width=160, height=120, fps=4.0, seed=3))
    (root / "scannetppv2").mkdir()
    shutil.move(root / "videos" / "scene_0003.mp4", root / "scannetppv2" / "scene_0003.mp4")
    qa_file = tmp_path / "qa.json"
    qa_file.write_text(json.dumps({"data": _mixed_qa(root)}, indent=1))

    manifest = tmp_path / "m.parquet"
    report = build_manifest([qa_file], manifest, TINY, corpus_root=root, clips_per_shard=2, workers=1)
    assert (report.num_qa_rows, report.bad_rows, report.num_clips) == (5, [], 4)
    assert {r["video"] for r in read_manifest(manifest).rows} == {
        "videos/scene_0000.mp4",
        "videos/scene_0001.mp4",
        "videos/scene_0002.mp4",
        "scannetppv2/scene_0003.mp4",
    }

    store = tmp_path / "store"
    command = precompute_command("local", manifest, store, fov_fixed_teacher(tmp_path / "teacher"))
    result = subprocess.run(command, env=ray_env(False), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, output(result)

    samples, joined = join_qa(qa_file, open_store(store), DataConfig(corpus_root=str(root)))
    assert (joined.rows, joined.joined, joined.clips, joined.skipped) == (5, 5, 4, 0)
    assert [s.where for s in samples] == [f"{qa_file} row {i}" for i in range(1, 6)]
    assert samples[0].clip_id == samples[4].clip_id

    model = tmp_path / "model"
    from geovr.student.tiny import write_tiny_qwen3vl

    write_tiny_qwen3vl(model)
    args = ["train", "--preset", "tiny", "--store", str(store), "--qa", str(qa_file), "--model", str(model)]
    args += ["--out", str(tmp_path / "run"), "--corpus-root", str(root)]
    for item in ("train.steps=1", "train.global_batch=1", "data.micro_batch=1", "train.tensorboard=false"):
        args += ["--set", item]
    code, err = run_cli(args, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["data"]["joined"], summary["data"]["missing_clip"]) == (5, 0)
