"""Driver memory benchmark (issue 17, item 6): how the precompute driver's RSS grows with the clips it
has committed, and what part of it is the driver's own live memory.

What it runs: the real precompute (`run_precompute`: the `Scheduler`, decode tasks, a tiny VGGT teacher
actor on CPU, encode and write tasks, a committed Zarr store) on a local loopback Ray cluster, once per
size in `--sizes` (a fresh driver process each), on synthetic clips (64x48, 4 frames, 4 clips per
shard). After every committed shard the driver samples:

- VmRSS, and its parts RssAnon (private memory) and RssShmem (pages of Ray's shared-memory object
  store that the driver process has touched: bounded by the object store's size, counted once per
  node, not the driver's own memory);
- glibc's heap (`mallinfo2`): bytes the allocator holds (`heap_kb`), bytes of live allocations
  (`inuse_kb`: Ray's core worker and every C++ or large Python allocation) and free bytes it keeps
  (`free_kb`).

Then the same sampling on a plain-Ray loop with the pipeline's task shapes (a 3-return decode task,
one threaded actor call per 4 clips with the frames as arguments, a 2-return encode task per clip,
one write task per shard taking the encoded refs nested in a list), no pipeline code: `ray_only`.

Per run: the growth from the first committed shard to the last, divided by the clips (the way the
13 KB/clip of issue 17 was figured), and the marginal slope, a line fitted over the second half of
the run. The extrapolation to 100,000 clips (labelled so) is the growth measured at the largest size
plus its marginal slope times the clips beyond it. CPU box figures, one run each; RSS is not timing,
so the shared box's load changes them little (its load is recorded).

    python bench/driver_memory.py [--sizes 150,600,1500] [--ray-only-clips 3000]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "driver_memory.json"
TARGET_CLIPS = 100_000
CLIPS_PER_SHARD = 4
ISSUE_KB_PER_CLIP = 13.0  # issue 17's figure: growth / clips of runs up to 800 clips


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost",
        )
    ]  # fmt: skip


def memory_sample() -> dict[str, int]:
    """This process's VmRSS, RssAnon, RssShmem and glibc heap figures, in KB."""
    sample = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssShmem"):
            sample[key] = int(line.split()[1])
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    sample["heap_kb"] = info.arena // 1024
    sample["inuse_kb"] = (info.uordblks + info.hblkhd) // 1024
    sample["free_kb"] = info.fordblks // 1024
    return sample


# ----------------------------------------------------------------------------------------------
# The measured processes (`--probe`): one driver each


def probe_precompute(work: Path, clips: int) -> list[dict[str, Any]]:
    """The real precompute of `clips` clips; a sample after each committed shard."""
    from rich.console import Console

    from geovr.app.presets import load_section
    from geovr.pipeline import precompute
    from geovr.pipeline.config import PrecomputeConfig, TeacherConfig

    teacher = load_section(TeacherConfig, "teacher", "tiny", checkpoint=work / "teacher", dtype="float32")
    cfg = load_section(PrecomputeConfig, "precompute", "tiny", device="cpu", clips_per_batch=4, num_actors=1)
    samples: list[dict[str, Any]] = []
    on_written = precompute.Scheduler.on_written

    def sampled(self: precompute.Scheduler, ref: Any, shard: Any) -> None:
        on_written(self, ref, shard)
        done = self.counts.clips_ok + self.counts.clips_failed
        samples.append({"clips": done, **memory_sample()})

    precompute.Scheduler.on_written = sampled  # type: ignore[method-assign]
    store = work / f"store_{clips}"
    shutil.rmtree(store, ignore_errors=True)
    result = precompute.run_precompute(
        work / f"manifest_{clips}.parquet", store, teacher, cfg, "local", Console(quiet=True)
    )
    shutil.rmtree(store, ignore_errors=True)
    if result.counts.clips_ok != clips:
        raise SystemExit(f"precompute labelled {result.counts.clips_ok} of {clips} clips")
    return samples


def probe_ray_only(clips: int) -> list[dict[str, Any]]:
    """The pipeline's task shapes on plain Ray, one shard of 4 clips at a time; a sample per shard."""
    import numpy as np
    import ray

    def decode(i: int) -> tuple[dict, np.ndarray, dict]:
        return {"ok": True}, np.zeros((4, 28, 28, 3), np.uint8), {"jpeg": [b"x" * 500] * 4, "i": i}

    class Teacher:
        def label(self, jobs: list[dict], *frames: np.ndarray) -> list[Any]:
            return [[{"ok": True}] * len(frames), *[{"depth": np.zeros((4, 8, 8), np.float32)}] * len(frames)]

    def encode(info: dict, labels: dict) -> tuple[dict, dict]:
        return {"ok": True}, {"info": info, "blob": b"y" * 2000}

    def write(encoded_refs: list[Any]) -> int:
        return len(ray.get(list(encoded_refs)))

    ray.init(
        address="local", num_cpus=3, _node_ip_address="127.0.0.1", include_dashboard=False,
        logging_level="WARNING", log_to_driver=False,
    )  # fmt: skip
    decode_task = ray.remote(decode).options(num_returns=3, num_cpus=1, max_retries=1)
    encode_task = ray.remote(encode).options(num_returns=2, num_cpus=1, max_retries=1)
    write_task = ray.remote(write).options(num_cpus=1, max_retries=2)
    teacher = ray.remote(Teacher).options(num_cpus=0, max_concurrency=2).remote()
    samples = []
    for done in range(CLIPS_PER_SHARD, clips + 1, CLIPS_PER_SHARD):
        decoded = [decode_task.remote(i) for i in range(CLIPS_PER_SHARD)]
        ray.get([status for status, _, _ in decoded])
        labels = teacher.label.options(num_returns=CLIPS_PER_SHARD + 1).remote(
            [{}] * CLIPS_PER_SHARD, *[frames for _, frames, _ in decoded]
        )
        ray.get(labels[0])
        encoded = [
            encode_task.remote(info, label) for (_, _, info), label in zip(decoded, labels[1:], strict=True)
        ]
        ray.get([status for status, _ in encoded])
        ray.get(write_task.remote([clip for _, clip in encoded]))
        samples.append({"clips": done, **memory_sample()})
    ray.shutdown()
    return samples


# ----------------------------------------------------------------------------------------------
# Analysis


def slope(samples: list[dict[str, Any]], key: str) -> float:
    """KB per clip of `key`: a least-squares line over the samples of the run's second half."""
    import numpy as np

    half = [s for s in samples if s["clips"] >= samples[-1]["clips"] / 2]
    x = np.array([s["clips"] for s in half], dtype=float)
    y = np.array([s[key] for s in half], dtype=float)
    return float(np.polyfit(x, y, 1)[0])


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth first -> last committed shard (total, per part) and the marginal slopes."""
    first, last = samples[0], samples[-1]
    clips = last["clips"] - first["clips"]
    growth = {key: last[key] - first[key] for key in first if key != "clips"}
    return {
        "clips": last["clips"],
        "first_kb": {k: v for k, v in first.items() if k != "clips"},
        "growth_kb": growth,
        "kb_per_clip_growth_over_clips": growth["VmRSS"] / clips,
        "kb_per_clip_marginal": {key: slope(samples, key) for key in ("VmRSS", "RssAnon", "inuse_kb")},
        "samples": [samples[i] for i in range(0, len(samples), max(1, len(samples) // 40))] + [last],
    }


def extrapolate(largest: dict[str, Any]) -> dict[str, Any]:
    def growth_mb(key: str) -> float:
        marginal = max(0.0, largest["kb_per_clip_marginal"][key])
        return (largest["growth_kb"][key] + marginal * (TARGET_CLIPS - largest["clips"])) / 1024

    return {
        "clips": TARGET_CLIPS,
        "driver_rss_growth_mb_extrapolated": growth_mb("VmRSS"),
        "driver_private_growth_mb_extrapolated": growth_mb("RssAnon"),
        "driver_live_heap_growth_mb_extrapolated": growth_mb("inuse_kb"),
        "rule": "growth measured at the largest size + its marginal slope x the clips beyond it",
        "issue_17_figure_mb": ISSUE_KB_PER_CLIP * TARGET_CLIPS / 1024,
    }


# ----------------------------------------------------------------------------------------------
# The run


def prepare(work: Path, sizes: list[int]) -> None:
    """Synthetic clips, a manifest per size and the tiny teacher (FoV pinned) under `work`."""
    sys.path.insert(0, str(REPO / "bench"))
    from precompute_throughput import write_checkpoint, write_videos

    from geovr.corpus.config import SamplingConfig
    from geovr.pipeline.index import build_manifest

    sampling = SamplingConfig(fps=2.0, min_frames=2, max_frames=4)
    for clips in sizes:
        videos = write_videos(work / f"corpus_{clips}", 2, 4, (64, 48), clips)
        manifest = work / f"manifest_{clips}.parquet"
        build_manifest([videos], manifest, sampling, clips_per_shard=CLIPS_PER_SHARD, workers=1)
    write_checkpoint("tiny", work / "teacher")


def run_probe(probe: str, clips: int, work: Path) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--probe", probe, "--clips", str(clips), "--work", str(work)]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{probe} of {clips} clips failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="150,600,1500", help="precompute runs, clips, ascending")
    parser.add_argument("--ray-only-clips", type=int, default=3000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/geovr-driver-memory"))
    parser.add_argument("--result", type=Path, default=RESULT)
    parser.add_argument("--probe", choices=("precompute", "ray_only"), help=argparse.SUPPRESS)
    parser.add_argument("--clips", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe == "precompute":
        print(json.dumps(probe_precompute(args.work, args.clips)))
        return
    if args.probe == "ray_only":
        print(json.dumps(probe_ray_only(args.clips)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    prepare(args.work, sizes)
    result: dict[str, Any] = {
        "benchmark": "bench/driver_memory.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared box)",
        "python": platform.python_version(),
        "commit": git_head(),
        "load_avg_before": list(os.getloadavg()),
        "clips_per_shard": CLIPS_PER_SHARD,
        "precompute": {},
    }
    for clips in sizes:
        print(f"precompute of {clips} clips", flush=True)
        result["precompute"][str(clips)] = summarise(run_probe("precompute", clips, args.work))
    print(f"plain Ray, {args.ray_only_clips} clips", flush=True)
    result["ray_only"] = summarise(run_probe("ray_only", args.ray_only_clips, args.work))
    result["production_size"] = extrapolate(result["precompute"][str(sizes[-1])])
    result["wall_s"] = time.perf_counter() - started
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result["production_size"].items()}, indent=1))


def git_head() -> str:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip()


if __name__ == "__main__":
    main()
