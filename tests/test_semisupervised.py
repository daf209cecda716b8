"""Semi-supervised training (`data.missing_labels: language_only`): QA rows whose clip has no labels in
the store train on language only, with frames decoded from the video exactly as precompute stores a
cached clip's, and geometric losses that never see those clips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geovr.app.presets import load_section
from geovr.pipeline.tasks import decode_clip
from geovr.student.batch import collate_samples
from geovr.student.config import DataConfig, StudentConfig
from geovr.student.data import DataError, RandomAccessDataset, StudentSampleBuilder, TrainLoader, join_qa
from geovr.student.model import GeoVRStudent
from geovr.student.objectives import OBJECTIVES
from geovr.student.tiny import write_tiny_qwen3vl
from geovr.student.training.config import TrainConfig, TrainInputs
from geovr.student.training.trainer import train
from geovr.student.unlabelled import LanguageOnlySource, decode_student_frames
from geovr.teacher_cache.frames import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, decode_jpeg
from geovr.teacher_cache.store import open_store
from tests.test_data_loader import SAMPLING, write_qa, write_test_store
from tests.test_precompute_video import smooth_frames, write_video

BUDGET = (VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS)
PRESET = "tiny-geovr-spatialsv"  # GeoVR's four objectives and the point map: every geometric loss


@pytest.fixture(scope="module")
def half_labelled(tmp_path_factory):
    """A store with scene_000/001 labelled; the corpus has videos of scene_002/003 only (not
    precomputed) and the QA file asks about all four."""
    root = tmp_path_factory.mktemp("semi")
    model = write_tiny_qwen3vl(root / "model")
    labelled = write_test_store(root / "store", "zarr", [2])
    corpus = root / "corpus"
    corpus.mkdir()
    unlabelled = ["scene_002.mp4", "scene_003.mp4"]
    for seed, name in enumerate(unlabelled):
        write_video(corpus / name, smooth_frames(40, 96, 128, seed=seed), fps=10)
    qa = write_qa(root / "qa.jsonl", labelled + unlabelled, per_video=2)
    return root, model, qa, corpus


def data_config(corpus, **values) -> DataConfig:
    settings = ["data.missing_labels=language_only", f"data.corpus_root={corpus}", "data.num_workers=0"]
    return load_section(DataConfig, "data", PRESET, settings, **values)


def test_language_only_frames_are_the_frames_precompute_stores(half_labelled):
    _, _, _, corpus = half_labelled
    status, _, info = decode_clip("scene_002.mp4", str(corpus), SAMPLING, *BUDGET, 90, (112, 28))
    assert status["ok"], status
    frames, seconds = decode_student_frames(corpus / "scene_002.mp4", SAMPLING, BUDGET, 90)
    cached = np.stack([decode_jpeg(jpeg) for jpeg in info["frames_jpeg"]])
    assert frames.shape == cached.shape and len(frames) == 8
    assert np.array_equal(frames, cached)
    assert np.array_equal(seconds, info["timestamps"])


def test_join_counts_language_only_rows_and_refuses_what_it_cannot_use(half_labelled):
    root, _, qa, corpus = half_labelled
    store = open_store(root / "store")
    samples, report = join_qa(qa, store, data_config(corpus))
    assert (report.rows, report.joined, report.clips) == (8, 8, 4)
    assert (report.language_only, report.language_only_clips, report.missing_clip) == (4, 2, 0)
    assert [s.labelled for s in samples] == [True] * 4 + [False] * 4
    assert "4 of them language only, on 2 clips without labels" in report.summary()
    # "skip" keeps the old behaviour; a row whose video file is absent is still missing.
    _, skipped = join_qa(qa, store, load_section(DataConfig, "data", PRESET))
    assert (skipped.joined, skipped.missing_clip, skipped.language_only) == (4, 4, 0)
    _, elsewhere = join_qa(qa, store, data_config(root))
    assert (elsewhere.joined, elsewhere.missing_clip) == (4, 4)
    assert "does not exist" in elsewhere.examples["missing_clip"][0]
    with pytest.raises(DataError, match="needs random access"):
        TrainLoader(samples, store, lambda: store, None, None, data_config(corpus, access="stream"), 0, 1, 0)


def test_half_labelled_geometric_gradients_come_only_from_labelled_clips(half_labelled):
    root, model, qa, corpus = half_labelled
    store = open_store(root / "store")
    samples, _ = join_qa(qa, store, data_config(corpus))
    builder = StudentSampleBuilder(
        model, 4096, "error", BUDGET, LanguageOnlySource.of_store(store.fingerprint, str(corpus))
    )
    dataset = RandomAccessDataset(samples, lambda: store, builder)
    built = [dataset[i] for i in (0, 2, 4, 6)]  # one row per clip: labelled, labelled, unlabelled, unlabelled
    assert [s.labelled for s in built] == [True, True, False, False]
    config = load_section(StudentConfig, "student", PRESET, base_model=str(model)).matched_to(
        store.fingerprint
    )
    torch.manual_seed(0)
    student = GeoVRStudent.from_base(model, config, dtype=torch.float32)
    assert {o.name for o in student.objectives} == set(OBJECTIVES)

    batch = collate_samples(built, builder.pad_token_id)
    batch.pixel_values_videos.requires_grad_(True)
    losses = student(batch)
    geometric = sum(o.weight(config) * losses[o.name] for o in student.objectives)
    (pixels_grad,) = torch.autograd.grad(geometric, batch.pixel_values_videos, retain_graph=True)
    (lm_grad,) = torch.autograd.grad(losses["lm"], batch.pixel_values_videos)
    per_clip = [int(t * h * w) for t, h, w in batch.video_grid_thw]
    geometric_by_clip = [g.abs().sum().item() for g in pixels_grad.split(per_clip)]
    lm_by_clip = [g.abs().sum().item() for g in lm_grad.split(per_clip)]
    assert geometric_by_clip[0] > 0 and geometric_by_clip[1] > 0
    assert geometric_by_clip[2] == 0.0 and geometric_by_clip[3] == 0.0
    assert all(v > 0 for v in lm_by_clip)  # language trains on every clip

    # Masked, not zero-filled: each geometric loss is the one of the labelled half alone.
    alone = student(collate_samples(built[:2], builder.pad_token_id))
    for objective in student.objectives:
        assert losses[objective.name].item() == pytest.approx(alone[objective.name].item(), rel=1e-4), (
            objective.name
        )


def test_a_half_labelled_run_trains_and_reports_its_join(half_labelled):
    root, model, qa, corpus = half_labelled
    settings = [
        "train.steps=2", "train.checkpoint_every=2", "train.global_batch=2", "train.warmup_ratio=0",
        "train.tensorboard=false", "data.micro_batch=2", "data.num_workers=0",
        "data.missing_labels=language_only", f"data.corpus_root={corpus}",
    ]  # fmt: skip
    run = root / "run"
    summary = train(
        TrainInputs(root / "store", qa, model, run),
        load_section(TrainConfig, "train", PRESET, settings),
        load_section(DataConfig, "data", PRESET, settings),
        load_section(StudentConfig, "student", PRESET, settings, base_model=str(model)),
    )
    assert summary["steps"] == 2
    report = json.loads((run / "data_report.json").read_text())
    assert (report["joined"], report["language_only"], report["language_only_clips"]) == (8, 4, 2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss.point_map"]) for r in records)
    assert any(r["loss.point_map"] > 0 for r in records)
