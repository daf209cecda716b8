"""Integrity on read: every reader training uses refuses a missing or damaged chunk, tar member or
tar with one `DamagedClipError` line naming store, shard, clip and field; the data loader turns
them into counted placeholders; old-layout stores are refused with the upgrade path, and `cache
convert` upgrades them bit for bit. Real Zarr v3 and tar files, damaged on disk."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from geovr.student.config import DataConfig
from geovr.student.data import DamagedSample, TokenBudgetCollator, TrainLoader, join_qa
from geovr.teacher_cache.codecs import CodecConfig
from geovr.teacher_cache.convert import convert_store
from geovr.teacher_cache.schema import DamagedClipError, SchemaError
from geovr.teacher_cache.store import open_store, open_writer, read_marker
from geovr.teacher_cache.verify import verify_store
from tests.test_cache_store import FINGERPRINT, make_clip, write_two_shards
from tests.test_data_loader import REPO, build_row_id, ids_collate, write_qa, write_test_store

GEOMETRY = "d12x16_f2x3x4x16k8"  # of `make_clip`
IDS = [f"{i:016x}" for i in range(5)]  # shard 000000: clips 0-2 (frames 0-11), shard 000001: clips 3-4


def flip(path: Path, offset: int, count: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[offset + i] ^= 0xFF
    path.write_bytes(bytes(data))


def member(tar_path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name)


def outcomes(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """{clip id: "ok" or the error line} by id (`read_clip`) and streamed (`iter_shard_checked`)."""
    reader = open_store(root)
    by_id = {}
    for clip_id in reader.clip_ids():
        try:
            reader.read_clip(clip_id)
            by_id[clip_id] = "ok"
        except DamagedClipError as err:
            by_id[clip_id] = str(err)
    streamed = {}
    for shard_id in reader.shards():
        for item in open_store(root).iter_shard_checked(shard_id):
            streamed[item.clip_id] = str(item) if isinstance(item, DamagedClipError) else "ok"
    return by_id, streamed


def expect(root: Path, damaged: dict[int, str]) -> dict[str, str]:
    prefix = {
        i: f"store {root}: shard {'000000' if i < 3 else '000001'} clip {IDS[i]}: field " for i in damaged
    }
    return {IDS[i]: prefix[i] + damaged[i] if i in damaged else "ok" for i in range(5)}


ZARR_DAMAGE = {
    "extrinsic chunk deleted": (
        lambda shard: (shard / GEOMETRY / "extrinsic/c/0/0/0").unlink(),
        dict.fromkeys(range(3), f"extrinsic: chunk file {GEOMETRY}/extrinsic/c/0/0/0 is missing"),
    ),
    "depth chunk deleted": (
        lambda shard: (shard / GEOMETRY / "depth_q/c/0/0/0").unlink(),
        dict.fromkeys(range(3), f"depth_q: chunk file {GEOMETRY}/depth_q/c/0/0/0 is missing"),
    ),
    # The first inner chunk holds frames 0-7 (clips 0 and 1); clip 2's chunk is intact.
    "feature chunk byte flipped": (
        lambda shard: flip(shard / GEOMETRY / "feat_q/c/0/0/0/0/0", 10),
        dict.fromkeys(range(2), "feat_q: a chunk fails its zstd check (Data corruption detected)"),
    ),
    "jpeg chunk byte flipped": (
        lambda shard: flip(shard / GEOMETRY / "jpeg_bytes/c/0", 100),
        dict.fromkeys(range(3), "frames_jpeg: a chunk fails its crc32c checksum"),
    ),
    "clip index byte flipped": (
        lambda shard: flip(shard / "zarr.json", 200, 1),
        dict.fromkeys(range(3), "metadata: zarr.json fails its sha256 checksum"),
    ),
    "shard deleted": (
        shutil.rmtree,
        dict.fromkeys(range(3), "shard: committed shard data 000000 is missing"),
    ),
}


@pytest.mark.parametrize("damage", list(ZARR_DAMAGE))
def test_damaged_zarr_shard_is_refused_by_both_read_paths(tmp_path, damage):
    root = tmp_path / "store"
    write_two_shards(root, "zarr")
    corrupt, damaged = ZARR_DAMAGE[damage]
    corrupt(root / "000000")
    by_id, streamed = outcomes(root)
    assert by_id == expect(root, damaged)
    assert streamed == by_id
    first = min(damaged)
    with pytest.raises(DamagedClipError) as err:
        list(open_store(root).iter_shard_encoded("000000"))
    assert str(err.value) == expect(root, damaged)[IDS[first]]


def _end_of(tar_path: Path, name: str) -> int:
    info = member(tar_path, name)
    return info.offset_data + info.size


def _cut_inside(tar_path: Path, name: str) -> None:
    info = member(tar_path, name)
    os.truncate(tar_path, info.offset_data + info.size // 2)


WDS_DAMAGE = {
    "jpg member": (
        lambda tar: flip(tar, member(tar, f"{IDS[1]}.0002.jpg").offset_data + 100, 8),
        {1: f"frames_jpeg: member {IDS[1]}.0002.jpg fails its crc32c checksum"},
        None,
    ),
    "cameras member": (
        lambda tar: flip(tar, member(tar, f"{IDS[1]}.cameras.safetensors").offset_data + 40),
        {1: f"cameras: member {IDS[1]}.cameras.safetensors fails its crc32c checksum"},
        None,
    ),
    # The last bytes of a zstd frame are its content checksum.
    "zstd member": (
        lambda tar: flip(tar, _end_of(tar, f"{IDS[0]}.features.safetensors.zst") - 2, 1),
        {
            0: f"features: member {IDS[0]}.features.safetensors.zst fails its zstd check (Restored data doesn't match checksum)"
        },
        None,
    ),
    "json member": (
        lambda tar: flip(tar, member(tar, f"{IDS[2]}.json").offset_data + 3, 1),
        {2: f"metadata: member {IDS[2]}.json fails its crc32c checksum"},
        None,
    ),
    # tarfile ends the archive at a header that fails its checksum: the rest of the tar is lost.
    "garbled tar header": (
        lambda tar: flip(tar, member(tar, f"{IDS[1]}.depth.safetensors.zst").offset + 10, 2),
        {
            1: f"depth: member {IDS[1]}.depth.safetensors.zst is missing",
            2: "tar: the sample is not in the tar",
        },
        {1: f"depth: member {IDS[1]}.depth.safetensors.zst is missing"},
    ),
    "truncated tar": (
        lambda tar: _cut_inside(tar, f"{IDS[1]}.features.safetensors.zst"),
        dict.fromkeys(
            (1, 2), "tar: the tar breaks off before the sample (ReadError: unexpected end of data)"
        ),
        "spans",
    ),
    "tar deleted": (
        lambda tar: tar.unlink(),
        dict.fromkeys(range(3), "shard: committed shard data 000000.tar is missing"),
        None,
    ),
}


@pytest.mark.parametrize("damage", list(WDS_DAMAGE))
def test_damaged_tar_is_refused_by_both_read_paths(tmp_path, damage):
    """Streamed: `streamed` damage; by id: the same, unless the damage says otherwise (a read by id
    sees only its own sample's bytes)."""
    root = tmp_path / "store"
    write_two_shards(root, "wds")
    corrupt, streamed_damage, by_id_damage = WDS_DAMAGE[damage]
    spans = {
        r["clip_id"]: r["location"]["span"] for r in read_marker(root, "000000")["clips"] if "location" in r
    }
    corrupt(root / "000000.tar")
    if by_id_damage == "spans":  # each clip the cut reaches: its byte range is short
        by_id_damage = {
            i: f"tar: the tar ends inside the sample's bytes {spans[IDS[i]][0]}-{spans[IDS[i]][1]} (truncated)"
            for i in (1, 2)
        }
    by_id, streamed = outcomes(root)
    assert streamed == expect(root, streamed_damage)
    assert by_id == expect(root, by_id_damage or streamed_damage)


def test_all_fill_chunks_are_stored_so_absent_always_means_lost(tmp_path):
    """Zarr leaves an all-fill chunk unwritten by default; layout 2 writes it (an all-zero confidence
    code, an invalid scale), and zero-size arrays (no outlier channels) have no chunk at all."""
    root = tmp_path / "store"
    clip = make_clip(3)  # scale_valid False
    clip.depth_conf[:] = 2.0  # constant: every conf_q difference is 0
    writer = open_writer(root, FINGERPRINT, "zarr", codecs=CodecConfig(feature_outlier_channels=0))
    writer.write_shard("000000", [clip], [])
    geometry = root / "000000" / "d12x16_f2x3x4x16k0"
    assert (geometry / "conf_q/c/0/0/0").is_file() and (geometry / "scale_valid/c/0").is_file()
    labels = open_store(root).read_clip(clip.clip_id)
    assert np.all(labels.depth_conf == np.float32(2.0)) and not labels.scale_valid
    assert labels.features.shape == clip.features.shape


# ----------------------------------------------------------------------------------------------
# Old layout: refused by every reader and writer, verified, upgraded by `cache convert`


# The benchmark's rewrite of a store as layout 1 wrote it (shards without checksums, markers
# without crcs): the old stores this code must refuse, and the baseline of its read-cost figure.
_spec = importlib.util.spec_from_file_location("cache_footprint", REPO / "bench" / "cache_footprint.py")
cache_footprint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cache_footprint)
rewrite_as_layout_1 = cache_footprint.rewrite_as_layout_1


@pytest.mark.parametrize("store_format", ["zarr", "wds"])
def test_old_layout_is_refused_and_converts_bit_for_bit(tmp_path, store_format):
    root, upgraded = tmp_path / "old", tmp_path / "new"
    clips = [make_clip(i) for i in (0, 1, 2, 3, 6)]  # 3 and 6: scale_valid False
    writer = open_writer(root, FINGERPRINT, store_format)
    writer.write_shard("000000", clips[:3], [])
    writer.write_shard("000001", clips[3:], [])
    original = open_store(root)
    expected = {c.clip_id: original.read_encoded(c.clip_id) for c in clips}
    rewrite_as_layout_1(root)
    if store_format == "zarr":  # an all-fill chunk: not written in layout 1, read as zeros there
        assert not list((root / "000001").rglob("scale_valid/c/*"))

    message = (
        f"{root}: store layout version 1 has no checksums to read it safely (this code reads version 2); "
        f"re-run precompute into a new store, or upgrade it with "
        f"`geovr-pipeline cache convert {root} NEW_STORE --format {store_format}`"
    )
    for refuse in (lambda: open_store(root), lambda: open_writer(root, FINGERPRINT, store_format)):
        with pytest.raises(SchemaError) as err:
            refuse()
        assert str(err.value) == message
    report = verify_store(root)
    assert report.ok and report.clips_checked == 5
    assert any("layout version 1" in w and "cache convert" in w for w in report.warnings)

    assert convert_store(root, upgraded, store_format)["clips"] == 5
    converted = open_store(upgraded)
    for clip_id, want in expected.items():
        got = converted.read_encoded(clip_id)
        assert got.frames_jpeg == want.frames_jpeg and got.meta == want.meta
        for name, array in want.arrays.items():
            value = got.arrays[name]
            assert (value.dtype, value.shape, value.tobytes()) == (
                array.dtype,
                array.shape,
                array.tobytes(),
            ), name
    assert verify_store(upgraded).ok and not verify_store(upgraded).warnings


# ----------------------------------------------------------------------------------------------
# The data loader: damaged clips become counted placeholders on both access paths


@pytest.mark.parametrize(
    ("store_format", "access", "workers"),
    [("zarr", "random", 0), ("zarr", "stream", 0), ("wds", "stream", 2)],
)
def test_loader_turns_a_damaged_clip_into_placeholders(tmp_path, store_format, access, workers):
    """Damaged clips reach the trainer as `DamagedSample`s carrying the reader's one-line report (also
    from DataLoader worker processes); every other sample is built as usual."""
    root = tmp_path / "store"
    videos = write_test_store(root, store_format, [2, 1])
    store = open_store(root)
    damaged_clip = store.clip_ids()[1]  # shard 000000, second clip
    if store_format == "zarr":
        geometry = next(p for p in (root / "000000").iterdir() if p.is_dir())
        (geometry / "extrinsic/c/0/0/0").unlink()  # both clips of the shard
        damaged = {store.clip_ids()[0], damaged_clip}
    else:
        tar = root / "000000.tar"
        flip(tar, member(tar, f"{damaged_clip}.cameras.safetensors").offset_data + 40)
        damaged = {damaged_clip}
    reasons = {clip_id: str(_read_error(store, clip_id)) for clip_id in damaged}

    config = DataConfig(
        access=access, micro_batch=2, num_workers=workers, resampled=False, samples_per_epoch=6
    )
    qa = write_qa(tmp_path / "qa.jsonl", videos, per_video=2)
    samples, _ = join_qa(qa, store, config)
    collator = TokenBudgetCollator(ids_collate, lambda s: s.tokens, config.max_batch_tokens)
    loader = TrainLoader(
        samples, store, functools.partial(open_store, root), build_row_id, collator, config, 0, 1, seed=3
    )
    seen_damaged, seen_good = [], []
    for _ in range(loader.batches_per_epoch):
        _, batch = loader.next()
        assert all(isinstance(d, DamagedSample) for d in batch.damaged)
        seen_damaged += batch.damaged
        seen_good += [row for chunk in batch.chunks for row in chunk]
    by_clip = {s.row_id: s.clip_id for s in samples}
    assert seen_damaged and len(seen_damaged) + len(seen_good) == 2 * loader.batches_per_epoch
    assert all(d.reason == reasons[by_clip[d.row_id]] for d in seen_damaged)
    assert all(by_clip[row] not in damaged for row in seen_good)


def _read_error(store, clip_id: str) -> DamagedClipError:
    with pytest.raises(DamagedClipError) as err:
        store.read_clip(clip_id)
    return err.value
