"""Costs that grow with the store (issue 17): the bounded shard-reader cache, the compact clip index
(one marker read per shard, one fingerprint digest, pickled into workers), retry reads of one shard,
parallel and quick `cache verify`, `index` normalising each distinct path once, write tasks that
reserve CPUs, loader workers that persist across epochs. Real Zarr v3 and tar stores."""

from __future__ import annotations

import functools
import json
import os
import pickle
import tracemalloc
from pathlib import Path

import pytest

from geovr.pipeline import index as index_module
from geovr.pipeline.config import PrecomputeConfig
from geovr.pipeline.precompute import write_task_options
from geovr.teacher_cache import store as store_module
from geovr.teacher_cache import verify as verify_module
from geovr.teacher_cache.schema import SchemaError, StoreFingerprint
from geovr.teacher_cache.store import iter_committed_shard, open_store, open_writer
from geovr.teacher_cache.verify import verify_store
from tests.test_cache_store import FINGERPRINT, make_clip

SHARDS, PER_SHARD = 6, 2


def write_store(root: Path, store_format: str) -> list[str]:
    """SHARDS shards of PER_SHARD tiny clips; returns the clip ids in order."""
    ids = []
    with open_writer(root, FINGERPRINT, store_format) as writer:
        for s in range(SHARDS):
            clips = [make_clip(s * PER_SHARD + i) for i in range(PER_SHARD)]
            writer.write_shard(f"{s:06d}", clips, [])
            ids += [c.clip_id for c in clips]
    return ids


@pytest.fixture(scope="module", params=["zarr", "wds"])
def store(request, tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("scale") / f"store_{request.param}"
    return root, write_store(root, request.param)


def test_shard_reader_cache_is_bounded_and_reads_stay_correct(store):
    root, ids = store
    reader = open_store(root, max_open_shards=2)
    first = {clip_id: reader.read_clip(clip_id).depth.tobytes() for clip_id in ids}
    assert len(reader._readers) == 2  # every shard was touched, two stay open
    again = {clip_id: reader.read_clip(clip_id).depth.tobytes() for clip_id in reversed(ids)}
    assert again == first and len(reader._readers) == 2
    with pytest.raises(ValueError, match="max_open_shards"):
        open_store(root, max_open_shards=0)


def test_open_reads_each_marker_once_and_digests_once(store, monkeypatch):
    root, ids = store
    reads, digests = [], []
    real_read, real_digest = store_module.read_marker, StoreFingerprint.digest
    monkeypatch.setattr(store_module, "read_marker", lambda r, s: reads.append(s) or real_read(r, s))
    monkeypatch.setattr(StoreFingerprint, "digest", lambda self: digests.append(1) or real_digest(self))
    reader = open_store(root)
    assert sorted(reads) == reader.shards() and len(digests) == 1
    assert reader.clip_ids() == ids


def test_pickled_reader_carries_the_compact_index_and_reads_no_marker(store, monkeypatch):
    """What a loader worker gets: no whole marker (no per-file sha256), no open shard, no marker read."""
    root, ids = store
    reader = open_store(root)
    reader.read_encoded(ids[0])
    payload = pickle.dumps(reader.detached())
    marker_bytes = sum(len((root / "_done" / f"{s}.json").read_bytes()) for s in reader.shards())
    assert payload.count(b'{"sha256"') <= len(reader.shards())  # Zarr: the root zarr.json's only
    if reader.format == "zarr":  # markers with a sha256 per file (a tar shard is one file)
        assert len(payload) < marker_bytes / 2
    monkeypatch.setattr(store_module, "read_marker", lambda *a: pytest.fail("a worker read a marker"))
    worker = pickle.loads(payload)
    assert worker._readers == {} and worker.clip_ids() == ids
    assert [worker.read_clip(i).clip_id for i in ids] == ids


def test_retry_reads_only_the_retried_shard(store):
    """--retry-failed keeps a shard's stored clips from that shard's marker alone: another shard's
    unreadable marker (which any whole-store open refuses) does not matter."""
    root, ids = store
    damaged = root / "_done" / f"{SHARDS - 1:06d}.json"
    saved = damaged.read_bytes()
    try:
        damaged.write_text("{not json")
        with pytest.raises(SchemaError):
            open_store(root)
        assert [c.clip_id for c in iter_committed_shard(root, "000000")] == ids[:PER_SHARD]
    finally:
        damaged.write_bytes(saved)


def test_write_tasks_reserve_cpus():
    assert write_task_options(PrecomputeConfig())["num_cpus"] == 1.0
    assert write_task_options(PrecomputeConfig(write_cpus=0.5))["num_cpus"] == 0.5
    with pytest.raises(ValueError, match="write_cpus"):
        PrecomputeConfig(write_cpus=0).validate()


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def test_verify_parallel_quick_and_full_read_each_marker_once(tmp_path, monkeypatch):
    """Full verify (2 processes) finds a flipped byte and a missing file, quick verify only the missing
    file (no payload read); both read each marker once and report progress to the last shard."""
    root = tmp_path / "store"
    write_store(root, "zarr")
    marker = json.loads((root / "_done" / "000001.json").read_text())
    payload = max((n for n in marker["files"] if "/c/" in n), key=lambda n: marker["files"][n]["bytes"])
    flip_last_byte(root / payload)
    gone = next(n for n in json.loads((root / "_done" / "000003.json").read_text())["files"] if "/c/" in n)
    (root / gone).unlink()

    full = verify_store(root, workers=2)
    assert full.bad_shards == ["000001", "000003"] and full.shards_checked == SHARDS
    assert any("fails its sha256" in p for s, p in full.problems if s == "000001")

    reads, progress = [], []
    real_read = verify_module.read_marker
    monkeypatch.setattr(verify_module, "read_marker", lambda r, s: reads.append(s) or real_read(r, s))
    quick = verify_store(root, quick=True, workers=1, on_progress=lambda d, t: progress.append((d, t)))
    assert quick.bad_shards == ["000003"] and quick.clips_checked == (SHARDS - 1) * PER_SHARD
    assert sorted(reads) == [f"{s:06d}" for s in range(SHARDS)]
    assert progress[-1] == (SHARDS, SHARDS)


def test_verify_quick_names_a_marker_that_lists_other_clips(tmp_path):
    root = tmp_path / "store"
    write_store(root, "zarr")
    path = root / "_done" / "000002.json"
    marker = json.loads(path.read_text())
    marker["clips"][0]["clip_id"] = "ffffffffffffffff"
    path.write_text(json.dumps(marker))
    report = verify_store(root, quick=True, workers=1)
    assert report.bad_shards == ["000002"]
    assert "marker lists" in report.problems[0][1]


def test_index_normalises_each_distinct_video_once(tmp_path, monkeypatch):
    rows = [{"id": str(n), "video": f"scenes/../scenes/v{n % 3}.mp4"} for n in range(60)]
    rows.append({"id": "bad", "video": "../outside.mp4"})
    rows.append({"id": "bad2", "video": "../outside.mp4"})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real = index_module.normalise_video
    monkeypatch.setattr(index_module, "normalise_video", lambda v, root: calls.append(v) or real(v, root))
    found = index_module.collect_videos([qa], tmp_path)
    assert sorted(calls) == sorted({r["video"] for r in rows})
    assert found.videos == {"scenes/v0.mp4": 20, "scenes/v1.mp4": 20, "scenes/v2.mp4": 20}
    assert found.qa_rows == 62 and len(found.bad_rows) == 2 and "outside" in found.bad_rows[1]


class PidSample:
    def __init__(self, pid: int):
        self.pid, self.tokens = pid, 10


def build_pid(sample, labels) -> PidSample:
    return PidSample(os.getpid())


def test_random_access_workers_persist_across_epochs(tmp_path):
    """One loader worker serves three epochs (the loader was rebuilt, with new workers, per epoch)."""
    from geovr.student.config import DataConfig
    from geovr.student.data import TokenBudgetCollator, TrainLoader, join_qa
    from tests.test_data_loader import write_qa, write_test_store

    store_dir = tmp_path / "store"
    qa = write_qa(tmp_path / "qa.jsonl", write_test_store(store_dir, "zarr", [2, 2]), per_video=1)
    config = DataConfig(access="random", micro_batch=2, num_workers=1, prefetch_factor=1, pin_memory=False)
    store = open_store(store_dir)
    samples, _ = join_qa(qa, store, config)
    collator = TokenBudgetCollator(lambda built: [b.pid for b in built], lambda b: b.tokens, 10_000)
    opener = functools.partial(open_store, store_dir)
    loader = TrainLoader(samples, store, opener, build_pid, collator, config, 0, 1, seed=3)
    pids, epochs = set(), set()
    for _ in range(3 * loader.batches_per_epoch):
        epoch, batch = loader.next()
        epochs.add(epoch)
        pids.update(pid for chunk in batch.chunks for pid in chunk)
    assert epochs == {0, 1, 2} and len(pids) == 1 and os.getpid() not in pids


def test_manifest_is_columnar(tmp_path):
    """A loaded manifest and its shard grouping cost about 100 bytes a row (as dicts: about 2 KB)."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from geovr.pipeline.index import MANIFEST_FORMAT_VERSION, MANIFEST_SCHEMA, read_manifest

    rows = 20_000
    columns = {field.name: [None] * rows for field in MANIFEST_SCHEMA}
    columns |= {
        "clip_id": [f"{n:016x}" for n in range(rows)], "video": [f"videos/v{n:07d}.mp4" for n in range(rows)],
        "shard": [f"{n // 8:06d}" for n in range(rows)], "status": ["ok"] * rows, "reason": [""] * rows,
        "num_qa_rows": [6] * rows,
    }  # fmt: skip
    meta = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "corpus_root": "/c",
        "sampling": {},
        "clips_per_shard": 8,
    }
    table = pa.table(columns, schema=MANIFEST_SCHEMA.with_metadata({"geovr": json.dumps(meta)}))
    pq.write_table(table, tmp_path / "m.parquet")

    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    manifest = read_manifest(tmp_path / "m.parquet")
    shards = manifest.shard_positions()
    python_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_row = (python_bytes + pa.total_allocated_bytes() - arrow_before) / rows
    assert per_row < 400, f"{per_row:.0f} bytes per manifest row"
    assert len(shards) == rows // 8 and manifest.take(shards["000002"])[0]["clip_id"] == f"{16:016x}"


def test_reader_follows_a_replaced_shard_in_its_compact_index(tmp_path):
    """A retried shard (its failed clip now stored) replaced and deleted under an open reader: the
    reader follows the marker, and its stored clips and failure rows are the new version's."""
    import time

    from geovr.teacher_cache.records import ClipFailure
    from geovr.teacher_cache.store import DONE_DIR, REVISION_GRACE_S

    root = tmp_path / "store"
    clips = [make_clip(i) for i in range(3)]
    failure = ClipFailure(clips[2].clip_id, clips[2].video, "teacher", "out of memory")
    with open_writer(root, FINGERPRINT, "zarr") as writer:
        writer.write_shard("000000", clips[:2], [failure])
    before = open_store(root)
    assert [f["clip_id"] for f in before.failures()] == [clips[2].clip_id]
    with open_writer(root, FINGERPRINT, "zarr") as writer:
        writer.write_shard("000000", clips, [], replace=True)
    replaced_at = time.time() - REVISION_GRACE_S - 1
    os.utime(root / DONE_DIR / "000000.json", (replaced_at, replaced_at))
    open_writer(root, FINGERPRINT, "zarr").close()  # deletes revision 0
    assert before.read_clip(clips[0].clip_id).clip_id == clips[0].clip_id
    assert before.shard_clip_ids("000000") == [c.clip_id for c in clips] and before.failures() == []


def test_cli_verify_quick_names_the_bad_shard(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "store"
    write_store(root, "zarr")
    marker = json.loads((root / "_done" / "000004.json").read_text())
    (root / next(n for n in marker["files"] if "/c/" in n)).unlink()
    cli = Path(sys.executable).parent / "geovr-pipeline"
    result = subprocess.run(
        [str(cli), "cache", "verify", str(root), "--quick", "--workers", "2"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "BAD shard 000004: file 000004/" in result.stderr and "is missing" in result.stderr
    assert "FAILED (1 bad shards: 000004)" in result.stdout and "(quick: no payload read)" in result.stdout


def test_cli_verify_on_a_local_ray_cluster_names_the_bad_shard(tmp_path):
    """`--ray-address local`: the shard batches run as Ray tasks (a cluster on loopback, ended with the command)."""
    import subprocess
    import sys

    root = tmp_path / "store"
    write_store(root, "zarr")
    marker = json.loads((root / "_done" / "000001.json").read_text())
    payload = max((n for n in marker["files"] if "/c/" in n), key=lambda n: marker["files"][n]["bytes"])
    flip_last_byte(root / payload)
    cli = Path(sys.executable).parent / "geovr-pipeline"
    result = subprocess.run(
        [str(cli), "cache", "verify", str(root), "--ray-address", "local"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"BAD shard 000001: file {payload} fails its sha256 checksum" in result.stderr
    assert f"FAILED (1 bad shards: 000001): {SHARDS} shards" in result.stdout


def test_joined_samples_are_packed_not_python_objects():
    """`join_qa`'s `SampleTable` gives back every sample exactly, and holds them as a few arrays (no
    object per row for a loader worker to copy): it retains well under half the list's memory."""
    from geovr.student.data import QASample, SampleTable
    from geovr.teacher_cache.qa import Turn

    tracemalloc.start()
    samples = [
        QASample(str(i), f"qa.jsonl:{i + 1}", f"scannet/scene{i % 7:04d}.mp4", f"clip-{i % 7}",
                 (Turn("user", f"<video>\nHow far is the chair {i} from the «sofa»?"), Turn("assistant", str(i))),
                 labelled=i % 5 != 0)
        for i in range(2000)
    ]  # fmt: skip
    list_bytes = tracemalloc.get_traced_memory()[0]
    table = SampleTable(samples)
    table_bytes = tracemalloc.get_traced_memory()[0] - list_bytes
    tracemalloc.stop()
    assert table_bytes < 0.4 * list_bytes, (table_bytes, list_bytes)
    assert len(table) == len(samples) and list(table) == samples and table[-1] == samples[-1]
    with pytest.raises(IndexError):
        table[len(samples)]
    assert table.labelled.tolist() == [s.labelled for s in samples]
    rows = table.rows_of_clip()
    assert list(rows) == table.clip_ids == [f"clip-{i}" for i in range(7)]
    assert all(samples[r].clip_id == clip for clip, clip_rows in rows.items() for r in clip_rows)
    assert sorted(r for clip_rows in rows.values() for r in clip_rows) == list(range(len(samples)))
