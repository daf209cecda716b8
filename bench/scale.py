"""Scale benchmark (issue 17): what an open store, a loader worker, `cache verify`, the QA join,
`index` and precompute's retry planning cost as the store and the QA file grow.

One Zarr store is built through the real writer (`StoreWriter.write_encoded_shard`: checksums,
fsync, done markers) in `--writers` processes, tiny clips (2 frames, 4x4 depth, 8-channel features,
16x16 JPEG frames), 8 per shard; every 25th shard also holds one failed clip. It grows to each of
`--sizes` shards in turn; at each size, fresh Python processes measure (so that each RSS figure is
that of one process doing one thing):

- open: `open_store` wall time and RSS growth, in a process that has imported what a loader worker
  imports (torch, the student data path); the pickled reader a worker receives, in bytes;
- worker: RSS growth after reading one clip of every shard with the LRU of shard readers
  (`data.open_shards`, default 64), and with an unbounded cache (what the code did before; at the
  sizes up to `--unbounded-up-to` only: touching a shard costs about 60 ms here);
- loader: a real `TrainLoader` (random access, 2 workers; one QA row per clip): time to the first
  micro-batch of each worker;
- verify: `verify_store` quick and full, 2 local processes, wall and CPU seconds;
- join: `join_qa` over a QA file of `--qa-rows[i]` rows naming the store's clips, wall and RSS growth,
  and the private memory a forked worker adds by reading every sample, for the packed `SampleTable`
  and for the same samples as a list of objects (what the join returned before);
- index: `collect_videos` (`index`'s QA pass) over the same file, wall and peak RSS growth;
- retry: the driver's plan (one store open and its failure rows) and, per retried shard, what the
  write task reads (`iter_committed_shard`), for 8 and 32 shards.

Each series y(x) is fitted as a power law y = a x^b over the sizes (b: the growth exponent) and as
a line; the larger of the two extrapolations to production size counts: 12,500 shards / 100,000 clips for store series, 590,000 rows for
QA series; extrapolated values are labelled so in the JSON. `budgets` holds each budget (name,
limit, extrapolated value, met) and `budgets_met` is true only when all hold. CPU box figures: the
times are of this shared machine (its load is recorded), the ratios and exponents are what matters.

    python bench/scale.py --out /dev/shm/geovr-scale [--sizes 1000,2500,8000] [--qa-rows 150000,300000,600000]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers builds the one valid tiny clip

CLIPS_PER_SHARD = 8
FAILED_EVERY = 25
TARGET = {"shards": 12_500, "clips": 100_000, "qa_rows": 590_000}
SAMPLING = {"fps": 1.0, "min_frames": 2, "max_frames": 2, "method": "uniform"}
RESULT = REPO / "bench" / "results" / "scale.json"


def fingerprint() -> Any:
    from geovr.teacher_cache.schema import StoreFingerprint

    return StoreFingerprint(
        teacher="scale-bench", checkpoint_sha256="0" * 64, teacher_config={}, metric_teacher="",
        preprocess={}, sampling=dict(SAMPLING), feature_layers=(0,),
    )  # fmt: skip


def video_name(n: int) -> str:
    return f"videos/v{n:07d}.mp4"


# ----------------------------------------------------------------------------------------------
# Building the store


def write_shards(root: str, token: str, first: int, stop: int) -> int:
    """Write shards [first, stop) under the run's lease (one writer process of `grow_store`)."""
    from geovr.teacher_cache.codecs import CodecConfig, encode_clip
    from geovr.teacher_cache.records import ClipFailure
    from geovr.teacher_cache.schema import clip_id_for
    from geovr.teacher_cache.store import open_writer
    from tests.helpers import clip_labels

    tiny = clip_labels(2, depth_hw=(4, 4), feature_shape=(1, 1, 1, 8), student_hw=(16, 16))
    encoded = encode_clip(tiny, CodecConfig())
    writer = open_writer(Path(root), fingerprint(), "zarr", lease_token=token)
    for shard in range(first, stop):
        if writer.is_committed(f"{shard:06d}"):
            continue
        clips, failures = [], []
        for n in range(shard * CLIPS_PER_SHARD, (shard + 1) * CLIPS_PER_SHARD):
            clip_id = clip_id_for(video_name(n), SAMPLING)
            if shard % FAILED_EVERY == 0 and n % CLIPS_PER_SHARD == CLIPS_PER_SHARD - 1:
                failures.append(ClipFailure(clip_id, video_name(n), "teacher", "bench: a failed clip"))
            else:
                clips.append(dataclasses.replace(encoded, clip_id=clip_id, video=video_name(n)))
        writer.write_encoded_shard(f"{shard:06d}", clips, failures)
    return stop - first


def grow_store(root: Path, shards: int, writers: int) -> float:
    """Write the missing shards below `shards` in `writers` processes; returns the wall seconds."""
    from geovr.teacher_cache.lease import acquire_lease
    from geovr.teacher_cache.store import open_writer

    started = time.perf_counter()
    lease = acquire_lease(root, "bench/scale.py")
    try:
        open_writer(root, fingerprint(), "zarr", lease=lease).close()
        have = len(list((root / "_done").glob("*.json")))
        bounds = [have + (shards - have) * w // writers for w in range(writers + 1)]
        ranges = list(itertools.pairwise(bounds))
        with ProcessPoolExecutor(writers) as pool:
            futures = [pool.submit(write_shards, str(root), lease.token, a, b) for a, b in ranges]
            for future in futures:
                future.result()
    finally:
        lease.release()
    return time.perf_counter() - started


def write_qa(path: Path, rows: int, clips: int) -> None:
    """`rows` QA rows in the VSI-590K style, row r naming the video of clip r mod `clips`."""
    with path.open("w") as f:
        for r in range(rows):
            video = video_name(r % clips)
            turns = [
                {"from": "human", "value": f"<video>\nHow many chairs? {r}"},
                {"from": "gpt", "value": "4"},
            ]
            f.write(json.dumps({"id": f"q{r}", "video": video, "conversations": turns}) + "\n")


# ----------------------------------------------------------------------------------------------
# Probes: each runs in a fresh process (`--probe NAME`) and prints one JSON object


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_open(store: Path, max_open_shards: int) -> dict[str, Any]:
    """Open the store and read one clip of every shard, as a loader worker would."""
    import pickle

    import geovr.student.data  # noqa: F401  (what a loader worker has imported)
    from geovr.teacher_cache.store import open_store

    base = rss_mb()
    started = time.perf_counter()
    reader = open_store(store, max_open_shards=max_open_shards)
    open_s = time.perf_counter() - started
    opened = rss_mb()
    pickled = len(pickle.dumps(reader.detached()))
    started = time.perf_counter()
    for shard_id in reader.shards():
        reader.read_encoded(reader.shard_clip_ids(shard_id)[0])
    return {
        "open_s": open_s, "open_rss_mb": opened - base, "pickled_reader_bytes": pickled,
        "touch_all_s": time.perf_counter() - started, "touched_rss_mb": rss_mb() - base,
        "base_rss_mb": base, "touched_abs_rss_mb": rss_mb(),
    }  # fmt: skip


def probe_loader(store: Path, qa: Path) -> dict[str, Any]:
    """A real random-access TrainLoader with 2 workers: time to each worker's first micro-batch."""
    from geovr.student.config import DataConfig
    from geovr.student.data import TokenBudgetCollator, TrainLoader, join_qa
    from geovr.teacher_cache.store import open_store

    config = DataConfig(access="random", micro_batch=4, num_workers=2, prefetch_factor=1, pin_memory=False)
    reader = open_store(store)
    samples, _ = join_qa(qa, reader, config)
    collator = TokenBudgetCollator(lambda built: [b[0] for b in built], lambda b: 1, 1 << 20)
    loader = TrainLoader(samples, reader, reader.detached, _build, collator, config, 0, 1, seed=0)
    started = time.perf_counter()
    firsts = []
    for _ in range(2):  # micro-batch 0 comes from worker 0, micro-batch 1 from worker 1
        loader.next()
        firsts.append(time.perf_counter() - started)
    return {"first_batch_s_per_worker": firsts}


def _build(sample: Any, labels: Any) -> tuple[str, int]:
    return (sample.row_id, labels.num_frames)


def probe_join(store: Path, qa: Path) -> dict[str, Any]:
    """`join_qa` (its `SampleTable`), then the same samples as a list of `QASample` objects (what
    the join returned before): the RSS each adds, and the private memory a forked loader worker adds
    by reading every sample once."""
    from geovr.student.config import DataConfig
    from geovr.student.data import join_qa
    from geovr.teacher_cache.store import open_store

    reader = open_store(store)
    base = rss_mb()
    started = time.perf_counter()
    table, report = join_qa(qa, reader, DataConfig())
    out = {"join_s": time.perf_counter() - started, "join_rss_mb": rss_mb() - base, "joined": report.joined}
    out["worker_touch_private_mb"] = forked_touch_private_mb(table)
    base = rss_mb()
    as_list = list(table)
    out["list_rss_mb"] = rss_mb() - base
    out["worker_touch_private_mb_list"] = forked_touch_private_mb(as_list)
    return out


def private_dirty_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Private_Dirty")


def forked_touch_private_mb(samples: Any) -> float:
    """Private memory (MB) a forked child adds by reading every sample once, as a loader worker does."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_dirty_mb()
        for i in range(len(samples)):
            samples[i].clip_id  # noqa: B018
        os.write(write, str(private_dirty_mb() - before).encode())
        os._exit(0)
    os.close(write)
    value = float(os.read(read, 64))
    os.waitpid(pid, 0)
    return value


def probe_index(qa: Path) -> dict[str, Any]:
    from geovr.pipeline.index import collect_videos

    base = peak_rss_mb()
    started = time.perf_counter()
    found = collect_videos([qa], qa.parent)
    return {
        "index_s": time.perf_counter() - started, "index_peak_rss_mb": peak_rss_mb() - base,
        "videos": len(found.videos), "rows": found.qa_rows,
    }  # fmt: skip


def probe_retry(store: Path) -> dict[str, Any]:
    """The driver's plan (one store open, its failure rows) and the write task's read per retried shard."""
    from geovr.teacher_cache.store import iter_committed_shard, open_store

    started = time.perf_counter()
    failed_shards = sorted({row["shard_id"] for row in open_store(store).failures()})
    plan_s = time.perf_counter() - started
    sum(1 for _ in iter_committed_shard(store, failed_shards[-1]))  # warm: imports, zarr's event loop
    per_shard = {}
    for count in (8, 32):
        chosen = failed_shards[:count]
        started = time.perf_counter()
        for shard_id in chosen:
            sum(1 for _ in iter_committed_shard(store, shard_id))
        per_shard[count] = (time.perf_counter() - started) / len(chosen)
    return {"plan_s": plan_s, "failed_shards": len(failed_shards), "per_shard_s": per_shard}


PROBES = {
    "open": lambda a: probe_open(a.store, 64),
    "open_unbounded": lambda a: probe_open(a.store, 1 << 30),
    "loader": lambda a: probe_loader(a.store, a.qa.with_name("qa_loader.jsonl")),
    "join": lambda a: probe_join(a.store, a.qa),
    "index": lambda a: probe_index(a.qa),
    "retry": lambda a: probe_retry(a.store),
}


def run_probe(name: str, store: Path, qa: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--probe", name, "--store", str(store), "--qa", str(qa)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_verify(store: Path, quick: bool) -> dict[str, float]:
    from geovr.teacher_cache.verify import verify_store

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    report = verify_store(store, quick=quick, workers=2)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not report.ok:
        raise RuntimeError(f"verify found problems in the bench store: {report.problems[:3]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "clips": report.clips_checked}


# ----------------------------------------------------------------------------------------------
# Growth fits, extrapolation and budgets

# name: (x axis, how to read y from a measured point)
SERIES = {
    "open_s": ("shards", lambda p: p["open"]["open_s"]),
    "open_rss_mb": ("shards", lambda p: p["open"]["open_rss_mb"]),
    "pickled_reader_mb": ("shards", lambda p: p["open"]["pickled_reader_bytes"] / 2**20),
    "worker_touched_rss_mb": ("shards", lambda p: p["open"]["touched_rss_mb"]),
    "worker_touched_rss_mb_unbounded_cache": ("shards", lambda p: p["open_unbounded"]["touched_rss_mb"]),
    "first_batch_s": ("shards", lambda p: max(p["loader"]["first_batch_s_per_worker"])),
    "verify_quick_wall_s": ("shards", lambda p: p["verify_quick"]["wall_s"]),
    "verify_full_wall_s": ("shards", lambda p: p["verify_full"]["wall_s"]),
    "verify_full_cpu_s": ("shards", lambda p: p["verify_full"]["cpu_s"]),
    "retry_plan_s": ("shards", lambda p: p["retry"]["plan_s"]),
    "retry_per_shard_s": ("shards", lambda p: p["retry"]["per_shard_s"]["32"]),
    "join_s": ("qa_rows", lambda p: p["join"]["join_s"]),
    "join_rss_mb": ("qa_rows", lambda p: p["join"]["join_rss_mb"]),
    "index_s": ("qa_rows", lambda p: p["index"]["index_s"]),
    "index_peak_rss_mb": ("qa_rows", lambda p: p["index"]["index_peak_rss_mb"]),
}
_ALWAYS = set(SERIES) - {"worker_touched_rss_mb_unbounded_cache"}  # measured at every size
TARGET_OF_AXIS = {"shards": TARGET["shards"], "qa_rows": TARGET["qa_rows"]}


def power_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares fit of log y = log a + b log x; returns (a, b). Values below 1e-6 (an RSS growth
    of nothing) count as 1e-6."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-6)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / sum((x - mx) ** 2 for x in lx)
    return math.exp(my - b * mx), b


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares fit of y = c + d x; returns (c, d)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    d = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - d * mx, d


def fits(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Per series: the measured values, the growth exponent, and the extrapolation to production
    size: the larger of the power law's and a straight line's (a constant plus linear growth, such
    as an import plus an index, fits a power law with a small exponent that would understate it)."""
    result = {}
    for name, (axis, read) in SERIES.items():
        measured = [(p[axis], read(p)) for p in points if name in _ALWAYS or "open_unbounded" in p]
        xs, ys = [x for x, _ in measured], [y for _, y in measured]
        (a, b), (c, d) = power_fit(xs, ys), linear_fit(xs, ys)
        target = TARGET_OF_AXIS[axis]
        result[name] = {
            "axis": axis, "measured": {str(x): y for x, y in measured}, "growth_exponent": b,
            "extrapolated_to": {axis: target}, "extrapolated_power_law": a * target**b,
            "extrapolated_linear": c + d * target, "extrapolated": max(a * target**b, c + d * target),
        }  # fmt: skip
    return result


def budgets(fit: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's budgets at the extrapolated production size."""
    rows = [
        ("open store per process (MB of RSS)", 50.0, fit["open_rss_mb"]["extrapolated"]),
        ("loader worker after touching every shard (MB of RSS)", 300.0, fit["worker_touched_rss_mb"]["extrapolated"]),
        # CPU seconds of the 2 verify processes / 2: the wall time on 2 cores of its own (the wall
        # time measured here, on a box shared with other jobs, is in the fits too).
        ("full verify of the tiny store on 2 cores (minutes)", 10.0, fit["verify_full_cpu_s"]["extrapolated"] / 120),
        ("index of 590k QA rows (MB of peak RSS)", 500.0, fit["index_peak_rss_mb"]["extrapolated"]),
        # Proportional to the retried shards: the cost per retried shard does not grow with the store.
        ("retry cost per retried shard: growth exponent in store size", 0.3, fit["retry_per_shard_s"]["growth_exponent"]),
    ]  # fmt: skip
    return [
        {"name": name, "limit": limit, "extrapolated": value, "extrapolation": True, "met": value < limit}
        for name, limit, value in rows
    ]


def measure_size(
    store: Path, out: Path, shards: int, qa_rows: int, writers: int, probes: list[str]
) -> dict[str, Any]:
    build_s = grow_store(store, shards, writers)
    qa = out / f"qa_{qa_rows}.jsonl"
    write_qa(qa, qa_rows, shards * CLIPS_PER_SHARD)
    write_qa(out / "qa_loader.jsonl", shards * CLIPS_PER_SHARD, shards * CLIPS_PER_SHARD)
    point: dict[str, Any] = {
        "shards": shards, "clips": shards * CLIPS_PER_SHARD, "qa_rows": qa_rows,
        "build_s": build_s, "load_avg_before": os.getloadavg(),
    }  # fmt: skip
    for name in probes:
        point[name] = run_probe(name, store, qa)
        print(f"  {shards} shards: {name} {json.dumps(point[name])}", flush=True)
    point["verify_quick"] = measure_verify(store, quick=True)
    point["verify_full"] = measure_verify(store, quick=False)
    print(f"  {shards} shards: verify quick {point['verify_quick']} full {point['verify_full']}", flush=True)
    point["load_avg_after"] = os.getloadavg()
    qa.unlink()
    return point


def write_result(result: dict[str, Any], path: Path) -> None:
    """Fit, extrapolate and check the budgets of `result["points"]`; write the JSON to `path`."""
    fit = fits(result["points"])
    checked = budgets(fit)
    result |= {
        "fits": fit, "budgets": checked, "budgets_met": all(b["met"] for b in checked),
        "note": "fits.*.extrapolated and budgets.*.extrapolated are extrapolations of power-law fits "
        "over the measured sizes to the production size, not measurements",
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({"budgets": checked, "budgets_met": result["budgets_met"]}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/dev/shm/geovr-scale"))
    parser.add_argument("--sizes", default="1000,2500,8000", help="store sizes in shards, ascending")
    parser.add_argument("--qa-rows", default="150000,300000,600000", help="QA rows at each size")
    parser.add_argument("--writers", type=int, default=2, help="processes writing shards")
    parser.add_argument("--result", type=Path, default=RESULT)
    parser.add_argument("--keep", action="store_true", help="keep the store under --out")
    parser.add_argument(
        "--resume", action="store_true", help="grow the store a kept or killed run left under --out"
    )
    parser.add_argument(
        "--unbounded-up-to", type=int, default=2500,
        help="measure the unbounded reader cache (the old behaviour) at sizes up to this many shards only",
    )  # fmt: skip
    parser.add_argument("--refit", action="store_true", help="recompute fits and budgets of --result")
    parser.add_argument("--probe", choices=sorted(PROBES), help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--qa", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(PROBES[args.probe](args)))
        return
    if args.refit:
        write_result(json.loads(args.result.read_text()), args.result)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    qa_rows = [int(s) for s in args.qa_rows.split(",")]
    if len(sizes) != len(qa_rows) or len(sizes) < 2 or sizes != sorted(sizes):
        parser.error("--sizes and --qa-rows: as many values each, at least 2, sizes ascending")
    store = args.out / "store"
    if not args.resume:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    points = []
    for shards, rows in zip(sizes, qa_rows, strict=True):
        print(f"store of {shards} shards, QA file of {rows} rows", flush=True)
        probes = [n for n in PROBES if n != "open_unbounded" or shards <= args.unbounded_up_to]
        points.append(measure_size(store, args.out, shards, rows, args.writers, probes))
    result = {
        "benchmark": "bench/scale.py", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared box)",
        "python": platform.python_version(), "clips_per_shard": CLIPS_PER_SHARD,
        "production_size": TARGET, "points": points, "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    write_result(result, args.result)
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
