"""`eval vsibench` end to end with a tiny random Qwen3-VL on generated VSI-format questions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from geovr.app import commands  # noqa: F401  (registers the CLI commands)
from geovr.app.cli import app
from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import write_corpus
from geovr.eval.config import PROFILES, QuestionConfig, VSIBenchConfig, build_geovr_prompt, build_prompt
from geovr.eval.questions import write_vsi_dataset
from geovr.eval.vsibench import (
    Qwen3VLGenerator,
    VideoQuestion,
    load_annotations,
    read_video_frames,
    run_vsibench,
    sample_indices,
)
from geovr.student.tiny import write_tiny_qwen3vl

NUM_QUESTIONS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_qwen3vl(tmp_path_factory.mktemp("tiny_qwen3vl"))


@pytest.fixture(scope="module")
def generator(model_dir) -> Qwen3VLGenerator:
    return Qwen3VLGenerator(model_dir, VSIBenchConfig(frames=4))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, SynthConfig(scenes=2, frames=12, width=64, height=48, fps=4.0, seed=0))
    return out


@pytest.fixture
def data_dir(corpus, tmp_path) -> Path:
    """A VSI directory with NUM_QUESTIONS questions over two videos."""
    out = tmp_path / "vsi"
    path = write_vsi_dataset(corpus, out, QuestionConfig(max_per_type=1))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keep = [r for r in rows if r["scene_name"] == "scene_0000"][:3] + [
        r for r in rows if r["scene_name"] == "scene_0001"
    ][:3]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return out


class CountingGenerator:
    """The real generator, counting the questions it is asked; raises KeyboardInterrupt on call `stop_at`."""

    def __init__(self, inner: Qwen3VLGenerator, stop_at: int | None = None) -> None:
        self.inner, self.stop_at, self.calls, self.asked = inner, stop_at, 0, 0

    def generate(self, requests):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.asked += len(requests)
        return self.inner.generate(requests)


def _ids(path: Path) -> list:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_prompts_are_the_benchmarks():
    numerical = {
        "question_type": "object_counting",
        "question": "How many chair(s) are in this room?",
        "options": None,
    }
    assert build_prompt(numerical) == (
        "These are frames of a video.\nHow many chair(s) are in this room?\n"
        "Please answer the question using a single word or phrase."
    )
    choice = {
        "question_type": "route_planning",
        "question": "Where?",
        "options": ["A. Turn Left", "B. Turn Back"],
    }
    assert build_prompt(choice) == (
        "These are frames of a video.\nWhere?\nOptions:\nA. Turn Left\nB. Turn Back\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_uniform_frame_sampling(corpus):
    assert sample_indices(12, 4).tolist() == [0, 4, 7, 11]
    assert sample_indices(100, 32)[[0, -1]].tolist() == [0, 99]
    assert sample_indices(3, 32).tolist() == [0, 1, 2]
    frames, times = read_video_frames(corpus / "videos" / "scene_0000.mp4", 4)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(times, np.array([0, 4, 7, 11]) / 4.0)


def test_parquet_annotations_read_like_jsonl(data_dir, tmp_path):
    rows, errors = load_annotations(data_dir)
    assert len(rows) == NUM_QUESTIONS and errors == []
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), parquet_dir / "test-00000-of-00001.parquet")
    assert load_annotations(parquet_dir) == (rows, [])


def test_left_padded_batch_equals_single_requests(generator, corpus):
    frames, times = read_video_frames(corpus / "videos" / "scene_0000.mp4", 4)
    frames = frames[:, :32, :32]  # one 32-pixel token per frame
    requests = [
        VideoQuestion(frames, times, "These are frames of a video.\nHow many chair(s) are in this room?"),
        VideoQuestion(frames[::-1].copy(), times, "Options:\nA. left\nB. right"),
    ]
    model = generator.model
    batch = generator.batch_inputs(requests)
    assert (
        batch["attention_mask"][1, 0] == 0 or batch["attention_mask"][0, 0] == 0
    )  # someone is padded, on the left
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        for row, request in enumerate(requests):
            single = model(**generator.batch_inputs([request])).logits[0, -1]
            torch.testing.assert_close(batched[row], single, atol=1e-4, rtol=1e-4)


def test_end_to_end_with_bad_rows_reported(model_dir, data_dir, tmp_path):
    with (data_dir / "test.jsonl").open("a") as f:
        base = json.loads((data_dir / "test.jsonl").read_text().splitlines()[0])
        f.write(json.dumps({**base, "id": 1000, "question_type": "object_height"}) + "\n")
        f.write('{"id": 1001, "question": \n')
        f.write(json.dumps({**base, "id": 1002, "scene_name": "missing_scene"}) + "\n")
        f.write(json.dumps({k: v for k, v in base.items() if k != "question"} | {"id": 1003}) + "\n")
    out = tmp_path / "out"
    args = ["eval", "vsibench", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out)]
    result = CliRunner().invoke(
        app, [*args, "--frames", "4", "--batch-size", "4", "--parser", "extract_number"]
    )
    assert result.exit_code == 0, result.output

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == NUM_QUESTIONS == len({p["id"] for p in predictions})
    assert all(isinstance(p["prediction"], str) and p["frames"] == 4 for p in predictions)
    errors = {e["id"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert "unknown question type" in errors[1000]
    assert "not found" in errors[1002]
    assert "missing field" in errors[1003]
    assert any("not valid JSON" in reason for reason in errors.values())

    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["model"] == str(model_dir)
        and summary["frames"] == 4
        and summary["parser"] == "extract_number"
    )
    assert summary["num_scored"] == NUM_QUESTIONS and summary["num_errors"] == 4
    assert "overall" in summary["scores"] and all(0.0 <= v <= 1.0 for v in summary["scores"].values())
    assert "| Model |" in (out / "summary.md").read_text()
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_asks_only_unanswered_questions(generator, model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    cfg = VSIBenchConfig(frames=4, batch_size=2)
    first = CountingGenerator(generator, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_vsibench(model_dir, data_dir, out, cfg, generator=first)
    answered = _ids(out / "predictions.jsonl")
    assert len(answered) == 2
    with (out / "predictions.jsonl").open("a") as f:  # a kill in the middle of a write
        f.write('{"id": 99, "dataset": "synth')

    second = CountingGenerator(generator)
    summary = run_vsibench(model_dir, data_dir, out, cfg, generator=second)
    assert second.asked == NUM_QUESTIONS - 2
    ids = _ids(out / "predictions.jsonl")
    assert ids[:2] == answered and len(ids) == len(set(ids)) == NUM_QUESTIONS
    assert summary["num_scored"] == NUM_QUESTIONS

    third = CountingGenerator(generator)
    run_vsibench(model_dir, data_dir, out, cfg, generator=third)
    assert third.calls == 0
    with pytest.raises(ValueError, match="frames"):
        run_vsibench(model_dir, data_dir, out, VSIBenchConfig(frames=8), generator=third)
    with pytest.raises(ValueError, match="--frame-pairing"):
        run_vsibench(model_dir, data_dir, out, VSIBenchConfig(frames=4, frame_pairing="repeat"))
    with pytest.raises(ValueError, match="--profile"):
        run_vsibench(model_dir, data_dir, out, VSIBenchConfig(profile="geovr", frames=4))


def test_consecutive_frame_pairing_halves_the_temporal_tokens(model_dir, corpus):
    frames, times = read_video_frames(corpus / "videos" / "scene_0000.mp4", 5)
    request = VideoQuestion(frames[:, :32, :32].copy(), times, "How many chair(s) are in this room?")
    inputs = {}
    for pairing in ("repeat", "consecutive"):
        generator = Qwen3VLGenerator(model_dir, VSIBenchConfig(frames=5, frame_pairing=pairing))
        inputs[pairing] = generator.batch_inputs([request])
    assert inputs["repeat"]["video_grid_thw"].tolist() == [[5, 2, 2]]
    assert inputs["consecutive"]["video_grid_thw"].tolist() == [[3, 2, 2]]  # 5 frames: 2 + 2 + (last twice)
    video_id = generator.video_token_id
    assert int((inputs["consecutive"]["input_ids"] == video_id).sum()) == 3
    assert int((inputs["repeat"]["input_ids"] == video_id).sum()) == 5
    with torch.no_grad():  # the model runs on the paired layout
        assert torch.isfinite(generator.model(**inputs["consecutive"]).logits).all()
    with pytest.raises(ValueError, match="frame pairing"):
        VSIBenchConfig(frame_pairing="pairs").validate()


def test_geovr_profile_prompts_are_eval_vsi_py():
    numerical = {"question_type": "object_counting", "question": "How many chair(s)?", "options": None}
    assert build_geovr_prompt(numerical) == (
        "How many chair(s)?\nPlease answer the question ONLY using a single Arabic numeral."
    )
    choice = {"question_type": "route_planning", "question": "Where?", "options": ["A. Left", "B. Back"]}
    assert (
        build_geovr_prompt(choice)
        == "Where?\nA. Left\nB. Back\nAnswer with ONLY the option's letter directly."
    )
    assert PROFILES["geovr"].prompt is build_geovr_prompt and PROFILES["lmms-eval"].prompt is build_prompt


def test_profiles_set_the_run_and_overrides_win():
    lmms, geovr = VSIBenchConfig(), VSIBenchConfig(profile="geovr")
    assert (lmms.profile, lmms.frames, lmms.parser, lmms.max_new_tokens, lmms.max_frame_tokens) == (
        "lmms-eval",
        32,
        "original",
        16,
        300,
    )
    assert (geovr.frames, geovr.parser, geovr.max_new_tokens, geovr.max_frame_tokens) == (
        128,
        "geovr",
        32768,
        384,
    )
    assert lmms.frame_pairing == geovr.frame_pairing == "consecutive"
    spec = geovr.spec
    assert (spec.do_sample, spec.top_p, spec.temperature, spec.top_k, spec.system_prompt) == (
        True,
        0.8,
        0.7,
        20,
        None,
    )
    assert not lmms.spec.do_sample and lmms.spec.system_prompt == "You are a helpful assistant."
    assert VSIBenchConfig(profile="geovr", frames=8, parser="extract_number").frames == 8
    with pytest.raises(ValueError, match="unknown profile"):
        VSIBenchConfig(profile="paper")
    # GeoVR's sampler always takes N indices (repeating frames of a short video); lmms-eval caps at the length.
    assert sample_indices(3, 5, cap=False).tolist() == [0, 0, 1, 2, 2] and sample_indices(3, 5).tolist() == [
        0,
        1,
        2,
    ]


def test_geovr_profile_end_to_end_names_its_profile(model_dir, data_dir, tmp_path):
    out = tmp_path / "geovr"
    args = ["eval", "vsibench", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out)]
    args += ["--profile", "geovr", "--frames", "4", "--max-new-tokens", "4", "--batch-size", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == NUM_QUESTIONS
    assert all(p["profile"] == "geovr" and p["frame_pairing"] == "consecutive" for p in predictions)
    assert all(p["prediction"] == p["prediction"].strip() for p in predictions)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["profile"], summary["parser"], summary["frames"]) == ("geovr", "geovr", 4)
    assert "profile: geovr" in (out / "summary.md").read_text()
    assert len(summary["scores"]) == 9  # GeoVR reports all 8 tasks (0 without questions) and the mean

    # Sampled answers come from a generator seeded by (seed, the batch's ids): a rerun repeats them.
    again = tmp_path / "again"
    result = CliRunner().invoke(app, [*args[:7], str(again), *args[8:]])
    assert result.exit_code == 0, result.output
    rerun = [json.loads(line) for line in (again / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in rerun] == [p["prediction"] for p in predictions]
