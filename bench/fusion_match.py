"""Train/inference match of Spatial-MLLM-style fusion: the fusion features the student trains on
(dequantised from the cache) against the ones the exported model's encoder computes online, on the
same frames of the same videos; cosine per token.

The whole chain runs through the CLI on the demo corpus (the tiny preset's `demo` section: 10
synthetic scenes of 32 frames at 256x192, the tiny random VGGT): `synth`-style corpus -> `index` ->
`precompute --preset tiny-fusion` (fusion features from the source frames) -> `train` (2 steps) ->
`export --teacher` -> `FusionModel.from_pretrained`, whose encoder (the aggregator cut after the fused
stage) runs on each clip's frames decoded again from the video (`corpus.video.decode_frames`, the
frame indices the store recorded). Up to quantisation the two must be one function of the frames:
p1 of the per-token cosine >= 0.99 is the acceptance bar (the codec alone gives about 0.998).

    python bench/fusion_match.py [--out bench/results/fusion_match_cpu_tiny.json] [--in-process]

CPU only; a smoke figure of the tiny models, not a statement about VGGT-1B's activations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from geovr.corpus.video import decode_frames, read_timestamps
from geovr.student.fusion_model import FusionModel
from geovr.teacher_cache.store import open_store

CLI = str(Path(sys.executable).parent / "geovr-pipeline")


def cached_and_online(store: Path, corpus_root: Path, model_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per clip of the store: (cached fusion features, online ones), both (S, h, w, D) float32."""
    reader = open_store(store)
    model = FusionModel.from_pretrained(model_dir)
    layers = reader.fingerprint.preprocess["fusion"]["layers"]
    index = layers.index(model.spec.fused_layer)
    pairs = []
    for clip_id in reader.clip_ids():
        labels = reader.read_clip(clip_id)
        path = corpus_root / labels.video
        source = decode_frames(path, labels.frame_indices, read_timestamps(path)).outputs[0]
        width, height = labels.meta["student_size"]
        online = model.spatial_features(source, (height, width)).float().numpy()
        pairs.append((labels.fusion[:, index], online))
    return pairs


def token_cosines(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Cosine of every token (all clips, frames and grid cells) between cached and online features."""
    values = []
    for cached, online in pairs:
        a, b = cached.reshape(-1, cached.shape[-1]), online.reshape(-1, online.shape[-1])
        values.append((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
    return np.concatenate(values)


def summary(cosines: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    relative = [np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in pairs]
    return {
        "clips": len(pairs),
        "tokens": int(cosines.size),
        "grid": list(pairs[0][0].shape[1:3]),
        "channels": int(pairs[0][0].shape[-1]),
        "cosine_p1": float(np.percentile(cosines, 1)),
        "cosine_median": float(np.median(cosines)),
        "cosine_min": float(cosines.min()),
        "relative_l2_max": float(max(relative)),
    }


def run(cmd: list[str]) -> str:
    """Run a CLI command (loopback Ray, one thread per process); its stdout, RuntimeError on failure."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout


def demo_synth() -> Any:
    """The demo corpus's settings (the tiny preset's `demo` section)."""
    from geovr.app.presets import read_preset
    from geovr.corpus.config import SynthConfig

    demo = read_preset("tiny")["demo"]
    return SynthConfig(
        scenes=demo["train_scenes"] + demo["heldout_scenes"],
        frames=demo["frames"],
        width=demo["width"],
        height=demo["height"],
        fps=demo["fps"],
        seed=demo["seed"],
    )


def precompute_in_process(videos: Path, store: Path, teacher: Path, preset: str = "tiny-fusion") -> None:
    """The precompute work (`pipeline.tasks`: decode and encode; `pipeline.teacher_actor`: labelling)
    runs one step after another in this process and the clips are committed as one shard: the
    functions the Ray driver schedules, without a Ray node (whose start times out on a heavily
    loaded box)."""
    from geovr.app.presets import load_section
    from geovr.corpus.config import SamplingConfig
    from geovr.pipeline.config import PrecomputeConfig, TeacherConfig
    from geovr.pipeline.tasks import decode_clip, encode_labels
    from geovr.pipeline.teacher_actor import TeacherActor
    from geovr.teacher_cache.schema import StoreFingerprint, clip_id_for
    from geovr.teacher_cache.store import open_writer

    sampling = load_section(SamplingConfig, "sampling", preset).policy()
    teacher_cfg = load_section(TeacherConfig, "teacher", preset, checkpoint=teacher)
    cfg = load_section(PrecomputeConfig, "precompute", preset)
    actor = TeacherActor(teacher_cfg, "cpu", 0, 1)
    parts = actor.fingerprint_parts()
    budget = {"video_max_pixels": cfg.video_max_pixels, "video_min_pixels": cfg.video_min_pixels}
    fingerprint = StoreFingerprint(
        **{k: parts[k] for k in ("teacher", "checkpoint_sha256", "teacher_config", "metric_teacher")},
        preprocess={**parts["preprocess"], "student_frames": budget},
        sampling=sampling,
        feature_layers=tuple(teacher_cfg.feature_layers),
    )
    writer = open_writer(store, fingerprint, cfg.format)
    encoded = []
    for video in sorted(path.name for path in videos.glob("*.mp4")):
        row = {"clip_id": clip_id_for(video, sampling), "video": video}
        status, frames, info = decode_clip(
            video, str(videos), sampling, cfg.video_max_pixels, cfg.video_min_pixels, cfg.jpeg_quality
        )
        job = {"clip_id": row["clip_id"], "keep": status["keep"], "student_hw": status["student_hw"]}
        statuses, labels = actor.label([job], frames)
        if not statuses[0]["ok"]:
            raise RuntimeError(f"{video}: {statuses[0]['reason']}")
        encoded.append(encode_labels(row, info, labels, writer.codecs)[1])
    writer.write_encoded_shard("000000", sorted(encoded, key=lambda clip: clip.clip_id), [])


def build_chain(work: Path, synth: Any, steps: int = 2, ray: bool = True) -> dict[str, Path]:
    """Corpus, tiny models, a fusion store, a `steps`-step fusion run and its export, through the CLI
    (`ray=False`: the store by `precompute_in_process`)."""
    from geovr.app.presets import load_section
    from geovr.corpus.config import SamplingConfig
    from geovr.corpus.synth import write_corpus
    from geovr.pipeline.index import build_manifest
    from geovr.student.tiny import write_tiny_qwen3vl
    from geovr.teachers.tiny import write_tiny_vggt

    videos = write_corpus(work / "corpus", synth)
    sampling = load_section(SamplingConfig, "sampling", "tiny-fusion")
    build_manifest(
        [work / "corpus" / "videos"], work / "manifest.parquet", sampling, clips_per_shard=4, workers=1
    )
    teacher = write_tiny_vggt(work / "vggt-tiny", synth.seed)
    model = write_tiny_qwen3vl(work / "qwen3vl-tiny", seed=synth.seed)
    if ray:
        run([CLI, "precompute", "--preset", "tiny-fusion", "--manifest", str(work / "manifest.parquet"),
             "--out", str(work / "store"), "--teacher", str(teacher), "--ray-address", "local", "--device", "cpu"])  # fmt: skip
    else:
        precompute_in_process(work / "corpus" / "videos", work / "store", teacher)
    qa = work / "qa.jsonl"
    rows = [
        {"id": f"q{i}", "video": f"{scene}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nHow many chairs are in this room?"}, {"from": "gpt", "value": "2"}]}
        for i, scene in enumerate(videos)
    ]  # fmt: skip
    qa.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run([CLI, "train", "--preset", "tiny-fusion", "--store", str(work / "store"), "--qa", str(qa), "--model",
         str(model), "--out", str(work / "run"), "--set", f"train.steps={steps}", "--set", "train.global_batch=2",
         "--set", "train.warmup_ratio=0", "--set", "train.tensorboard=false"])  # fmt: skip
    run([CLI, "export", str(work / "run"), "--out", str(work / "export"), "--teacher", str(teacher)])
    return {
        "corpus": work / "corpus",
        "videos": work / "corpus" / "videos",
        "store": work / "store",
        "run": work / "run",
        "export": work / "export",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/fusion_match_cpu_tiny.json"))
    parser.add_argument(
        "--in-process", action="store_true", help="label the store without Ray (`precompute_in_process`)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_chain(Path(tmp), demo_synth(), ray=not args.in_process)
        pairs = cached_and_online(paths["store"], paths["videos"], paths["export"])
        stats = open_store(paths["store"]).fingerprint.preprocess["fusion"]
        result = {
            "what": "cached (dequantised) vs online fusion features per token, demo corpus, tiny VGGT",
            "corpus": demo_synth().__dict__,
            "precompute": "in process (pipeline.tasks)" if args.in_process else "CLI, local Ray cluster",
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared); a CPU smoke figure",
            "fusion_feature_set": stats,
            **summary(token_cosines(pairs), pairs),
            "wall_s": round(time.perf_counter() - started, 1),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
