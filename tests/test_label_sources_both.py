"""Label source "both" (issue 16): precompute stores the teacher's labels and, beside them, the
ground truth (`ClipLabels.ground_truth`, `gt_*` arrays in both backends, checked by `cache verify`,
carried by `convert`); the fingerprint records the choice; the trainer picks per field with
`data.<field>_label` (`student.label_choice`), counts samples whose clip fell back to the teacher,
and refuses a choice the store cannot serve in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from geovr.student.batch import camera_target, collate_samples, make_sample
from geovr.student.label_choice import check_label_choice, choose_labels
from geovr.teacher_cache.convert import convert_store
from geovr.teacher_cache.schema import DamagedClipError
from geovr.teacher_cache.store import open_store, open_writer
from geovr.teacher_cache.verify import verify_store
from tests.helpers import label_synthetic_clip
from tests.test_cache_integrity import flip, member
from tests.test_data_loader import SAMPLING, store_fingerprint, synthetic_clip, write_qa
from tests.test_train_damage import train_in_process

SOURCES = {"depth": "both", "camera": "both", "scale": "both"}
GT_ARRAYS = {  # stored ground-truth array -> the main array of a gt-only store it must equal
    "gt_depth_q": "depth_q", "gt_depth_log_range": "depth_log_range", "gt_conf_q": "conf_q",
    "gt_conf_log_range": "conf_log_range", "gt_pose_enc": "pose_enc", "gt_extrinsic": "extrinsic",
    "gt_intrinsic": "intrinsic", "gt_scale": "scale", "gt_scale_valid": "scale_valid",
}  # fmt: skip


@pytest.fixture(scope="module")
def labelled(synth_corpus: Path, reference_dir: Path) -> dict:
    """One synthetic clip decoded and labelled by the tiny teacher (its infinite intrinsics made
    finite, so that the teacher's cameras can be stored)."""
    info, teacher = label_synthetic_clip(synth_corpus, reference_dir)
    teacher["intrinsic"] = np.nan_to_num(teacher["intrinsic"], posinf=100.0)
    return {"info": info, "teacher": teacher, "corpus": synth_corpus}


def _encode(labelled: dict, sources: dict[str, str], video: str = "videos/scene_0001.mp4"):
    from geovr.pipeline.tasks import encode_labels
    from geovr.teacher_cache.codecs import CodecConfig

    ground_truth = {"corpus_root": str(labelled["corpus"]), "sources": sources}
    status, encoded = encode_labels(
        {"clip_id": "c" * 16, "video": video}, labelled["info"], dict(labelled["teacher"]), CodecConfig(),
        None if set(sources.values()) == {"teacher"} else ground_truth,
    )  # fmt: skip
    assert status["ok"], status
    return status, encoded


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _stored(root: Path, store_format: str, encoded) -> dict[str, np.ndarray]:
    with open_writer(root, store_fingerprint(), store_format) as writer:
        writer.write_encoded_shard("000000", [encoded], [])
    return open_store(root).read_encoded(encoded.clip_id).arrays


@pytest.mark.parametrize("store_format", ["zarr", "wds"])
def test_both_stores_the_teacher_and_the_ground_truth(labelled: dict, tmp_path: Path, store_format: str):
    """A "both" clip's main arrays are those of a teacher-only store, its `gt_*` arrays those of a
    gt-only store, bit for bit, in either backend and after converting to the other; a video without
    RGB-D falls back to the teacher only; a damaged ground-truth array fails `cache verify`."""
    teacher = _stored(tmp_path / "t", store_format, _encode(labelled, dict.fromkeys(SOURCES, "teacher"))[1])
    truth = _stored(tmp_path / "g", store_format, _encode(labelled, dict.fromkeys(SOURCES, "gt"))[1])
    both = _stored(tmp_path / "b", store_format, _encode(labelled, SOURCES)[1])
    assert set(both) == set(teacher) | set(GT_ARRAYS)
    for name in teacher:
        assert _same(both[name], teacher[name]), name
    for name, main in GT_ARRAYS.items():
        assert _same(both[name], truth[main]), name
    clip = open_store(tmp_path / "b").read_clip("c" * 16)
    assert clip.meta["label_sources"] == SOURCES and clip.ground_truth_fields == ("depth", "camera", "scale")
    np.testing.assert_array_equal(clip.ground_truth["pose_enc"], truth["pose_enc"])
    other = "wds" if store_format == "zarr" else "zarr"
    convert_store(tmp_path / "b", tmp_path / "b2", other)
    converted = open_store(tmp_path / "b2").read_encoded("c" * 16).arrays
    assert set(converted) == set(both) and all(_same(converted[n], both[n]) for n in both)

    status, fallback = _encode(labelled, SOURCES, video="elsewhere/scene_0001.mp4")
    assert status["gt_fallback"] == "no RGB-D folder"
    assert (
        fallback.meta["label_sources"] == dict.fromkeys(SOURCES, "teacher")
        and not fallback.ground_truth_fields
    )

    assert verify_store(tmp_path / "b").ok
    if store_format == "zarr":
        (geometry,) = [p for p in (tmp_path / "b" / "000000").iterdir() if p.is_dir()]
        assert geometry.name.endswith("_gtdcs")
        flip(geometry / "gt_depth_q/c/0/0/0", 10)
    else:
        tar = tmp_path / "b" / "000000.tar"
        flip(tar, member(tar, f"{'c' * 16}.ground_truth.safetensors.zst").offset_data + 40)
    assert not verify_store(tmp_path / "b").ok
    with pytest.raises(DamagedClipError) as damaged:  # the reader names the ground-truth array
        open_store(tmp_path / "b").read_clip("c" * 16)
    assert damaged.value.field == ("gt_depth_q" if store_format == "zarr" else "ground_truth")


def test_fingerprint_records_the_choice(tmp_path: Path) -> None:
    """teacher, gt and both give three fingerprints; a teacher-only store's records no ground truth."""
    from rich.console import Console

    from geovr.pipeline.config import PrecomputeConfig, TeacherConfig
    from geovr.pipeline.index import Manifest
    from geovr.pipeline.precompute import Precompute

    manifest = Manifest(pa.table({"video": pa.array([], pa.string())}), tmp_path, dict(SAMPLING), 8)
    parts = {"teacher": "t", "checkpoint_sha256": "0" * 64, "teacher_config": {}, "metric_teacher": "",
             "preprocess": {}}  # fmt: skip
    digests = {}
    for source in ("teacher", "gt", "both"):
        cfg = PrecomputeConfig(depth_source=source, camera_source=source)
        cfg.validate()
        run = Precompute(manifest, tmp_path, TeacherConfig(feature_layers=(0,)), cfg, Console(), None)
        fingerprint = run.fingerprint(parts)
        digests[source] = fingerprint.digest()
        assert ("ground_truth" in fingerprint.preprocess) == (source != "teacher")
    assert len(set(digests.values())) == 3


def _both_clip(video: str, fallback: bool = False, rng_seed: int = 0):
    """A clip of a "both" store (teacher labels, ground truth beside them), or one that fell back."""
    teacher = synthetic_clip(video, 4, (64, 64), np.random.default_rng(rng_seed))
    if fallback:
        return dataclasses.replace(
            teacher, meta={**teacher.meta, "label_sources": dict.fromkeys(SOURCES, "teacher")}
        )
    other = synthetic_clip(video, 4, (64, 64), np.random.default_rng(rng_seed + 100))
    extrinsic = other.extrinsic.copy()
    extrinsic[:, 1, 3] += 0.2 * np.arange(4)  # a different trajectory than the teacher's
    truth = {"depth": other.depth * 2.0, "depth_conf": np.ones_like(other.depth), "pose_enc": other.pose_enc,
             "extrinsic": extrinsic, "intrinsic": other.intrinsic * 1.1, "scale": 0.25, "scale_valid": True}  # fmt: skip
    return dataclasses.replace(teacher, ground_truth=truth, meta={**teacher.meta, "label_sources": SOURCES})


def test_label_choice_per_field() -> None:
    both, fallback = _both_clip("a.mp4"), _both_clip("b.mp4", fallback=True)
    chosen, fell_back = choose_labels(both, {"depth": "gt", "camera": "stored", "scale": "gt"})
    assert not fell_back and chosen.scale == 0.25
    np.testing.assert_array_equal(chosen.depth, both.ground_truth["depth"])
    np.testing.assert_array_equal(chosen.extrinsic, both.extrinsic)  # camera: the stored (teacher's)
    assert choose_labels(both, dict.fromkeys(SOURCES, "teacher"))[0] is both
    chosen, fell_back = choose_labels(fallback, dict.fromkeys(SOURCES, "gt"))
    assert fell_back == ("depth", "camera", "scale") and chosen is fallback
    gt_clip = dataclasses.replace(
        both, ground_truth=None, meta={**both.meta, "label_sources": {"depth": "gt"}}
    )
    assert choose_labels(gt_clip, {"depth": "gt"}) == (gt_clip, ())
    with pytest.raises(ValueError, match="its depth labels are ground truth, no teacher copy"):
        choose_labels(gt_clip, {"depth": "teacher"})
    bad = dataclasses.replace(both, ground_truth={"depth": both.depth})  # depth without depth_conf
    with pytest.raises(ValueError, match="field ground_truth holds"):
        bad.validate()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from geovr.student.tiny import write_tiny_qwen3vl

    return write_tiny_qwen3vl(tmp_path_factory.mktemp("both_model") / "model")


def test_samples_take_the_chosen_targets(tiny_model: Path) -> None:
    """make_sample with camera and depth chosen "gt" on a "both" clip: the ground-truth targets; with
    "stored": the teacher's; a fallback clip's sample is flagged in the batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    clip, turns = (
        _both_clip("a.mp4"),
        [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": "Here."}],
    )
    gt = make_sample(clip, turns, tokenizer, label_choice={"depth": "gt", "camera": "gt"})
    stored = make_sample(clip, turns, tokenizer, label_choice=dict.fromkeys(SOURCES, "stored"))
    truth = dataclasses.replace(clip, **{k: clip.ground_truth[k] for k in ("extrinsic", "intrinsic")})
    torch.testing.assert_close(gt.depth, torch.from_numpy(clip.ground_truth["depth"]))
    torch.testing.assert_close(gt.pose_enc, camera_target(truth))
    torch.testing.assert_close(stored.depth, torch.from_numpy(clip.depth))
    torch.testing.assert_close(stored.pose_enc, camera_target(clip))
    assert not torch.allclose(gt.pose_enc, stored.pose_enc) and gt.scale == stored.scale == clip.scale
    fallback = make_sample(_both_clip("b.mp4", fallback=True), turns, tokenizer, label_choice={"depth": "gt"})
    batch = collate_samples([gt, fallback], int(tokenizer.pad_token_id))
    assert batch.label_fallback.tolist() == [False, True]


def _train_store(root: Path, sources: dict[str, str]) -> tuple[Path, list[str]]:
    """A Zarr store precomputed with `sources`: scene_000 with ground truth, scene_001 fell back."""
    videos = ["scene_000.mp4", "scene_001.mp4"]
    fingerprint = store_fingerprint()
    preprocess = {**fingerprint.preprocess, "ground_truth": {**sources, "conventions": "vggt-normalised-v1"}}
    with open_writer(root, dataclasses.replace(fingerprint, preprocess=preprocess), "zarr") as writer:
        writer.write_shard(
            "000000", [_both_clip(videos[0]), _both_clip(videos[1], fallback=True, rng_seed=1)], []
        )
    return root, videos


def test_train_counts_fallbacks_and_refuses_what_the_store_lacks(tiny_model, tmp_path, capsys) -> None:
    store, videos = _train_store(tmp_path / "store", SOURCES)
    qa = write_qa(tmp_path / "qa.jsonl", videos, per_video=1)
    ws = {"model": tiny_model}
    out = tmp_path / "run"
    code, err = train_in_process(ws, store, qa, out, capsys, ["train.steps=2", "data.depth_label=gt"])
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["label_fallback_samples"] for r in records) == 1  # the epoch draws scene_001 once
    assert json.loads((out / "summary.json").read_text())["counters"]["label_fallback_samples"] == 1
    assert "1 sample(s) trained on the teacher's labels for a field chosen gt" in err

    gt_store, _ = _train_store(
        tmp_path / "gt_store", {"depth": "gt", "camera": "teacher", "scale": "teacher"}
    )
    code, err = train_in_process(ws, gt_store, qa, tmp_path / "run2", capsys, ["train.steps=1", "data.depth_label=teacher"])  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: {gt_store}: data.depth_label=teacher but the store's depth labels are ground truth "
        "(depth_source=gt keeps no teacher copy); use stored or gt, or precompute with depth_source=both"
    )
    with pytest.raises(ValueError, match=r"data\.scale_label=gt but the store holds no ground-truth scale"):
        check_label_choice(open_store(gt_store).fingerprint, {"scale": "gt"}, str(gt_store))


def test_eval_geometry_scores_against_the_stored_ground_truth() -> None:
    """On a "both" clip, `gt_*` metrics compare with the stored ground truth: perfect for predictions
    equal to it, not for the teacher's labels; a clip that fell back has none."""
    from geovr.eval.label_quality import predictions_against_stored_truth

    clip = _both_clip("a.mp4")
    truth = dataclasses.replace(clip, **clip.ground_truth)

    def predictions(labels):
        return {"depth": labels.depth, "pose_enc": camera_target(labels).numpy(), "scale": labels.scale}

    perfect = predictions_against_stored_truth(clip, predictions(truth))
    assert perfect["gt_depth_abs_rel"] < 1e-6 and perfect["gt_pose_auc30"] == 1.0
    assert perfect["gt_scale_log_error"] < 1e-9
    teacher = predictions_against_stored_truth(clip, predictions(clip))
    assert teacher["gt_scale_log_error"] > 1.0 and teacher["gt_translation_error_deg"] > 1.0
    assert teacher["gt_depth_abs_rel"] > 0.1
    assert predictions_against_stored_truth(_both_clip("b.mp4", fallback=True), predictions(clip)) == {}
