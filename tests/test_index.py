"""`geovr-pipeline index`: folders and QA files -> Parquet manifest (real mp4 files probed with PyAV)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from geovr.app.cli import _register_commands, app
from geovr.corpus.config import SamplingConfig, SynthConfig
from geovr.corpus.synth import write_corpus
from geovr.pipeline.index import assign_shards, build_manifest, read_manifest
from geovr.teacher_cache.schema import clip_id_for
from tests.test_precompute_video import write_bad_inputs

TINY = SamplingConfig(fps=2.0, min_frames=4, max_frames=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """videos/scene_000{0,1,2}.mp4 (10 frames, 160x120, 4 fps) plus the bad inputs under videos/odd/."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, SynthConfig(scenes=3, frames=10, width=160, height=120, fps=4.0, seed=0))
    write_bad_inputs(root / "videos" / "odd")
    return root / "videos"


def test_folder_source(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.parquet"
    report = build_manifest([corpus], out, TINY, clips_per_shard=4, workers=2)
    manifest = read_manifest(out)
    rows = {r["video"]: r for r in manifest.rows}
    assert set(rows) == {
        "scene_0000.mp4",
        "scene_0001.mp4",
        "scene_0002.mp4",
        *(
            f"odd/{n}"
            for n in ("gray.mkv", "odd_size.mp4", "vfr.mp4", "too_short.mp4", "corrupt.mp4", "empty.mp4")
        ),
    }
    assert manifest.corpus_root == corpus and manifest.sampling == TINY.policy()
    good = rows["scene_0001.mp4"]
    assert good["clip_id"] == clip_id_for("scene_0001.mp4", TINY.policy())
    assert (good["status"], good["width"], good["height"], good["num_frames"]) == ("ok", 160, 120, 10)
    assert good["fps"] == pytest.approx(4.0) and good["duration_s"] == pytest.approx(2.5)
    assert rows["odd/vfr.mp4"]["variable_frame_rate"] and rows["odd/vfr.mp4"]["status"] == "ok"
    assert rows["odd/gray.mkv"]["pix_fmt"] == "gray" and rows["odd/odd_size.mp4"]["width"] == 165
    assert {v: rows[v]["status"] for v in ("odd/too_short.mp4", "odd/corrupt.mp4", "odd/empty.mp4")} == {
        "odd/too_short.mp4": "too-short",
        "odd/corrupt.mp4": "corrupt",
        "odd/empty.mp4": "empty",
    }
    assert (
        rows["odd/corrupt.mp4"]["num_frames"] is None and "corrupt.mp4" in rows["odd/corrupt.mp4"]["reason"]
    )
    assert [b["video"] for b in report.bad] == ["odd/corrupt.mp4", "odd/empty.mp4", "odd/too_short.mp4"]
    # Shards: clips sorted by id, 4 per shard.
    ordered = sorted(r["clip_id"] for r in manifest.rows)
    assert [r["clip_id"] for r in manifest.rows] == ordered
    assert [r["shard"] for r in manifest.rows] == ["000000"] * 4 + ["000001"] * 4 + ["000002"]
    # Deterministic: the same inputs give the same file content.
    again = tmp_path / "again.parquet"
    build_manifest([corpus], again, TINY, clips_per_shard=4, workers=1)
    assert pq.read_table(again).equals(pq.read_table(out))


def test_qa_files_dedupe_and_report_missing(corpus: Path, tmp_path: Path) -> None:
    rows = [
        {
            "id": "q1",
            "video": "scene_0000.mp4",
            "conversations": [{"from": "human", "value": "<video>\nHow many chairs?"}],
        },
        {"id": "q2", "video": "scene_0000.mp4", "conversations": []},
        {"id": "q3", "video": "./scene_0001.mp4", "conversations": []},
        {"id": "q4", "image": "a.jpg", "conversations": []},
        {"id": "q5", "video": "gone/missing.mp4", "conversations": []},
    ]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    as_json = tmp_path / "qa.json"
    as_json.write_text(json.dumps(rows[2:]))
    out = tmp_path / "m.parquet"
    report = build_manifest([jsonl, as_json], out, TINY, corpus_root=corpus, clips_per_shard=2, workers=1)
    manifest = read_manifest(out)
    by_video = {r["video"]: r for r in manifest.rows}
    assert set(by_video) == {"scene_0000.mp4", "scene_0001.mp4", "gone/missing.mp4"}
    assert by_video["scene_0000.mp4"]["num_qa_rows"] == 2 and by_video["scene_0001.mp4"]["num_qa_rows"] == 2
    assert (report.num_qa_rows, report.rows_without_video) == (6, 1)
    assert by_video["gone/missing.mp4"]["status"] == "missing"
    assert report.bad == [
        {"video": "gone/missing.mp4", "status": "missing", "reason": by_video["gone/missing.mp4"]["reason"]}
    ]

    # Rows the QA contract refuses are counted with their file and line; the run goes on.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"video": "scene_0002.mp4"}\n{not json\n{"video": ["a.mp4", "b.mp4"]}\n')
    report = build_manifest([broken], out, TINY, corpus_root=corpus, workers=1)
    assert [r["video"] for r in read_manifest(out).rows] == ["scene_0002.mp4"]
    assert len(report.bad_rows) == 2 and report.num_qa_rows == 3
    assert report.bad_rows[0].startswith(f"{broken}:2: not valid JSON")
    assert report.bad_rows[1] == f"{broken}:3: 'video' names 2 videos; a row may name exactly one"


def test_extend_keeps_existing_shards(corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    for name in ("scene_0000.mp4", "scene_0001.mp4"):
        shutil.copy(corpus / name, root / name)
    first = tmp_path / "first.parquet"
    build_manifest([root], first, TINY, clips_per_shard=1, workers=1)
    shutil.copy(corpus / "scene_0002.mp4", root / "scene_0002.mp4")
    shutil.copy(corpus / "scene_0000.mp4", root / "copy_of_0.mp4")
    second = tmp_path / "second.parquet"
    build_manifest([root], second, TINY, clips_per_shard=1, extend=first, workers=1)
    old = {r["clip_id"]: r["shard"] for r in read_manifest(first).rows}
    new = {r["clip_id"]: r["shard"] for r in read_manifest(second).rows}
    assert all(new[cid] == shard for cid, shard in old.items())
    assert sorted(s for cid, s in new.items() if cid not in old) == ["000002", "000003"]
    # A different policy cannot extend (clip ids would not match).
    with pytest.raises(ValueError, match="sampling policy"):
        build_manifest([root], tmp_path / "x.parquet", SamplingConfig(fps=1.0), extend=first, workers=1)


def test_assign_shards_packs_new_clips_after_previous() -> None:
    assert assign_shards(["b", "a", "c"], 2) == {"a": "000000", "b": "000000", "c": "000001"}
    assert assign_shards(["a", "b", "z", "y"], 2, previous={"a": "000000", "b": "000003"}) == {
        "a": "000000",
        "b": "000003",
        "y": "000004",
        "z": "000004",
    }


def test_index_command(corpus: Path, tmp_path: Path) -> None:
    _register_commands()
    out = tmp_path / "m.parquet"
    result = CliRunner().invoke(
        app,
        [
            "index",
            str(corpus),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--clips-per-shard",
            "3",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "indexed 9 clips into 3 shards" in result.output and "odd/corrupt.mp4" in result.output
    manifest = read_manifest(out)
    assert manifest.sampling == {"fps": 2.0, "min_frames": 4, "max_frames": 8, "method": "uniform"}
    result = CliRunner().invoke(app, ["index", str(tmp_path / "nowhere"), "--out", str(out)])
    assert result.exit_code != 0 and "nowhere" in str(result.exception or result.output)


# Indexes a folder and prints the report's unusable entries as JSON (run without the right to read
# files one may not read: see `without_read_override`).
INDEX_AND_REPORT = """
import json, sys
from pathlib import Path
from geovr.pipeline.index import build_manifest
from geovr.corpus.config import SamplingConfig

report = build_manifest([Path(sys.argv[1])], Path(sys.argv[2]), SamplingConfig(fps=2.0, min_frames=4, max_frames=8), workers=1)
print(json.dumps(report.bad))
"""


def without_read_override() -> list[str]:
    """A command prefix that keeps root from reading a file of mode 000 (as any other user cannot)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a file of mode 000 stays readable")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-all"]


def test_folder_entries_that_are_not_videos_are_listed_with_a_reason(corpus: Path, tmp_path: Path) -> None:
    videos, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    (videos / "folder.mp4").mkdir(parents=True)
    (videos / "sub").mkdir()
    elsewhere.mkdir()
    shutil.copy(corpus / "scene_0000.mp4", videos / "good.mp4")
    shutil.copy(corpus / "scene_0001.mp4", videos / "folder.mp4" / "inner.mp4")
    shutil.copy(corpus / "scene_0002.mp4", elsewhere / "linked.mp4")
    shutil.copy(corpus / "scene_0000.mp4", videos / "locked.mp4")
    (videos / "locked.mp4").chmod(0)
    (videos / "dangling.mp4").symlink_to("nowhere.mp4")
    (videos / "loop.mp4").symlink_to("loop.mp4")
    (videos / "more").symlink_to(elsewhere)  # a symlinked folder is followed
    (videos / "sub" / "up").symlink_to("..")  # ... but not back into its own ancestors

    out = tmp_path / "m.parquet"
    command = [*without_read_override(), sys.executable, "-c", INDEX_AND_REPORT, str(videos), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["video"]: r for r in read_manifest(out).rows}
    assert {v for v, r in rows.items() if r["status"] == "ok"} == {
        "good.mp4",
        "folder.mp4/inner.mp4",
        "more/linked.mp4",
    }
    assert json.loads(result.stdout) == [
        {
            "video": "dangling.mp4",
            "status": "broken-link",
            "reason": f"broken-link: {videos}/dangling.mp4 is a dangling symlink (to nowhere.mp4, which does not exist)",
        },
        {
            "video": "folder.mp4",
            "status": "not-a-file",
            "reason": f"not-a-file: {videos}/folder.mp4 is a folder",
        },
        {
            "video": "locked.mp4",
            "status": "unreadable",
            "reason": f"unreadable: {videos}/locked.mp4: permission denied",
        },
        {
            "video": "loop.mp4",
            "status": "symlink-loop",
            "reason": f"symlink-loop: {videos}/loop.mp4 is a symlink loop",
        },
        {
            "video": "sub/up",
            "status": "symlink-loop",
            "reason": f"symlink-loop: {videos}/sub/up leads back to its own folder {videos}; not followed",
        },
    ]
    assert all(rows[b]["reason"] for b in ("dangling.mp4", "folder.mp4", "locked.mp4", "loop.mp4"))
