"""The fusion recipe end to end on CPU: a synthetic corpus labelled with the `tiny-fusion` preset
(fusion features from a real tiny VGGT, by the precompute tasks run in process: Ray's node start
times out on this shared box under load; the Ray path itself is `tests/test_precompute*.py`'s and
`bench/fusion_match.py`'s), trained for a few steps from that store through the CLI (finite,
falling losses), exported with its encoder, the cached features against the exported encoder's
online ones (cosine p1 >= 0.99), and `eval vsibench` of the exported model on a tiny synthetic
benchmark."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from geovr.corpus.config import SynthConfig
from geovr.eval.config import QuestionConfig
from geovr.eval.questions import write_vsi_dataset
from geovr.student.fusion_model import FusionModel
from geovr.teacher_cache.store import open_store
from geovr.teacher_cache.verify import verify_store
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("fusion_match", REPO / "bench" / "fusion_match.py")
fusion_match = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fusion_match)

STEPS = 6


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("fusion_chain")
    synth = SynthConfig(scenes=2, frames=10, width=160, height=120, fps=4.0, seed=11)
    return fusion_match.build_chain(work, synth, steps=STEPS, ray=False)


@pytest.mark.slow
def test_store_holds_both_feature_sets(chain) -> None:
    assert verify_store(chain["store"]).ok
    reader = open_store(chain["store"])
    assert reader.fingerprint.preprocess["fusion"]["layers"] == [3]
    for clip_id in reader.clip_ids():
        labels = reader.read_clip(clip_id)
        width, height = labels.meta["student_size"]
        # the student's unmerged 16-pixel grid, full width (2 x the tiny VGGT's 64 channels)
        assert labels.fusion.shape == (labels.num_frames, 1, height // 16, width // 16, 128)
        assert labels.features.shape[1] == 4  # GeoVR's distillation features beside them


@pytest.mark.slow
def test_fusion_preset_trains_with_falling_losses(chain) -> None:
    rows = [json.loads(line) for line in (chain["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] and sum(losses[STEPS // 2 :]) < sum(losses[: STEPS // 2])


@pytest.mark.slow
def test_exported_encoder_matches_the_cache(chain) -> None:
    model = FusionModel.from_pretrained(chain["export"])
    assert len(model.encoder.aggregator.frame_blocks) == model.spec.fused_layer + 1 == 4
    assert model.encoder.depth_head is None and model.encoder.camera_head is None
    pairs = fusion_match.cached_and_online(chain["store"], chain["videos"], chain["export"])
    result = fusion_match.summary(fusion_match.token_cosines(pairs), pairs)
    assert result["cosine_p1"] >= 0.99, result
    assert result["relative_l2_max"] < 0.1, result


@pytest.mark.slow
def test_eval_vsibench_runs_the_exported_fusion_model(chain, tmp_path) -> None:
    data = tmp_path / "vsi"
    write_vsi_dataset(chain["corpus"], data, QuestionConfig(max_per_type=1))
    out = tmp_path / "eval"
    fusion_match.run(
        [fusion_match.CLI, "eval", "vsibench", "--model", str(chain["export"]), "--data", str(data),
         "--out", str(out), "--frames", "4", "--limit", "3"]
    )  # fmt: skip
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and all(isinstance(p["prediction"], str) for p in predictions)
    assert json.loads((out / "summary.json").read_text())["model"] == str(chain["export"])
