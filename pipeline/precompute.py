"""`geovr-pipeline precompute`: manifest -> decode -> teacher -> committed cache shards, on Ray.

Why Ray core (tasks + actors) and not Ray Data with a custom datasink:
- A shard must be written whole and committed by exactly one task, and resume works at shard
  granularity. Ray Data re-partitions blocks as it likes; mapping its blocks back onto our fixed
  shards (and knowing when a shard is complete) would mean fighting its scheduler. Here the driver
  owns the shard -> clips mapping and submits one writer task per shard when its last clip is done.
- Per-clip failures must be recorded and the run must go on. In Ray Data one failed block aborts the
  job (`max_errored_blocks=0`) or is silently dropped; here every decode task and every teacher call
  returns a status per clip, and failures travel with their shard into the store's commit record.
- The teacher must be loaded once per GPU and fed batches of clips of a deterministic composition
  (so a resumed run writes byte-identical labels). An explicit actor pool gives that directly.

Data flow (all large data stays in the object store; the driver only sees small status dicts):

    driver ──decode_clip(row)──▶ CPU task: probe timestamps, sample, decode (PyAV), resize + JPEG the
       │                          student frames, resize the teacher frames
       │                          ──▶ (status, frames (S,Ht,Wt,3) uint8, info)
       │◀─ status ───────────────────────────┘
       ├─ TeacherActor.label(jobs, *frames) ──▶ GPU actor (num_gpus=1; CPU actor with --device cpu):
       │                                         [statuses, labels clip 0, labels clip 1, ...]
       │◀─ statuses ─────────────────────────────┘
       ├─ encode_labels(row, info, labels) ──▶ CPU task: ClipLabels -> the store's EncodedClip
       │◀─ status ───────────────────────────┘
       └─ write_shard(shard, encoded refs, failures) ──▶ one task per shard, when its last clip is
                                         done: store.open_writer(...).write_encoded_shard(...)

Batches are consecutive successfully-decoded clips of one shard in manifest order, `clips_per_batch`
at a time, so a batch's composition does not depend on task timing.

Backpressure (memory stays bounded whatever the corpus size): at most `max_inflight_shards` shards
are open at once (their encoded clips wait in the object store until the shard's writer runs; the
float32 labels live only between the teacher and the clip's encode task), at most
`decode_workers` decode tasks run at once, decoding pauses while `2 * clips_per_batch * actors`
decoded clips wait for a teacher, and each actor has at most `ACTOR_QUEUE` (2) batches queued (the
next batch's frames arrive while the current one runs, so the GPU does not wait on the driver).
An actor runs its queued calls in `ACTOR_QUEUE` threads with one on the device at a time: a
finished batch's labels (about 130 MB per 32-frame clip) are put into the object store while the
next batch already runs.
The driver holds references and status dicts only, never frames or labels: at 100,000 videos it
holds the manifest as one Arrow table (about 100 bytes a row) and dicts of the in-flight shards' rows.
Its RSS grows by a one-off 10 to 12 MB over the first few hundred clips and then by about 2 KB a clip
or less, still falling, while glibc's live heap stays flat (`bench/driver_memory.py`): the growth is
Ray's core worker warming up, free memory the allocator keeps, and object-store pages the driver has
touched (shared memory, bounded by the object store), not references or records kept per clip.

Resume and drift: the store's fingerprint (teacher name, checkpoint hash, teacher config, metric
teacher, preprocessing, sampling policy, feature layers) is built from the first actor's labeler and
the manifest; `open_writer` refuses a store written under another fingerprint and says what
differs. Committed shards are skipped. `--retry-failed` re-runs only the clips a committed shard
recorded as failed and rewrites that shard with the stored clips unchanged plus those now labelled.

One run per store: `run_precompute` takes the store's lease (`teacher_cache.lease`) before it
connects to Ray and gives it up at the end; another run on the store is refused with one line naming
the holder, a lease whose run is gone is taken over with a warning, and the write tasks commit only
while this run holds the lease (they check its token). The teacher settings are checked against the
checkpoint's config in the driver, before any actor starts; an actor that still fails to start is
reported in one line. `--ray-address local`: the in-process cluster ends with the driver, however it
ends (`driver_watchdog`).

Failures: a clip that cannot be used is recorded with its stage (`index`, `probe`, `sample`,
`decode`, `teacher`, `encode`) and reason; the run goes on. Non-finite teacher output (e.g. a zero
field of view) is said once, at the first clip; the run stops when the teacher's first clips all have
it (`Scheduler.check_teacher_output` says why). `STORE/failures.jsonl` is rebuilt at the end of
every run from the committed shards; the command exits non-zero only when failed / all clips of
the store exceeds `max_failure_ratio`.

Teacher out of memory (`TeacherOOM` from the labeler) or a clip longer than `max_teacher_frames`:
the clip is labelled as two overlapping halves and merged (`clip_split`), recursively; the clip's
metadata records the split.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from rich.console import Console
from rich.markup import escape

from geovr.corpus.config import SamplingConfig
from geovr.corpus.ground_truth import CONVENTIONS as GT_CONVENTIONS
from geovr.pipeline.config import PrecomputeConfig, TeacherConfig
from geovr.pipeline.driver_watchdog import start_watchdog, stop_watchdog
from geovr.pipeline.index import Manifest, read_manifest
from geovr.pipeline.progress import PrecomputeProgress, RunCounts, summary_table
from geovr.pipeline.tasks import decode_clip, encode_labels, write_shard
from geovr.pipeline.teacher_actor import TeacherActor
from geovr.teacher_cache import __version__
from geovr.teacher_cache.config import to_dict
from geovr.teacher_cache.lease import StoreLease, acquire_lease
from geovr.teacher_cache.records import ClipFailure, write_failures, write_run_record
from geovr.teacher_cache.schema import StoreFingerprint
from geovr.teacher_cache.store import StoreReader, StoreWriter, open_store, open_writer

# Batches queued per teacher actor (and its threads): the next batch's frames are fetched, and the
# last batch's labels stored, while the current one runs.
ACTOR_QUEUE = 2
# The run stops when this many clips (or all, when fewer) come out of the teacher non-finite before
# any comes out finite (`Scheduler.check_teacher_output` says why).
NONFINITE_STOP_CLIPS = 4


# ----------------------------------------------------------------------------------------------
# What the driver tracks: clips, shards, batches, and the events it waits for


@dataclass
class _Clip:
    row: dict[str, Any]
    state: str = "pending"  # pending -> decoding -> decoded -> labelling -> encoding -> done | failed
    frames_ref: Any = None
    info_ref: Any = None
    encoded_ref: Any = None
    keep: int = 0
    student_hw: tuple[int, int] | None = None  # the student frame size (the fusion pass's input)

    def failure(self, stage: str, reason: str) -> ClipFailure:
        return ClipFailure(self.row["clip_id"], self.row["video"], stage, reason)


@dataclass
class _Shard:
    """A shard to label: `positions` of its rows in the manifest; `clips` made when it starts."""

    shard_id: str
    positions: np.ndarray
    keep_stored: bool = False
    clips: list[_Clip] = field(default_factory=list)
    failures: list[ClipFailure] = field(default_factory=list)
    next_to_batch: int = 0  # clips before this index are resolved (decoded or failed) and batched
    forming: list[_Clip] = field(default_factory=list)
    writing: bool = False

    def complete(self) -> bool:
        return all(c.state in ("done", "failed") for c in self.clips)


@dataclass
class _Batch:
    shard: _Shard
    clips: list[_Clip]
    attempts: int = 0


@dataclass(frozen=True)
class Decoded:
    """A clip's decode task finished (the event of its status ref)."""

    shard: _Shard
    clip: _Clip


@dataclass(frozen=True)
class Labelled:
    """A teacher call finished: `label_refs` hold each clip's labels."""

    batch: _Batch
    actor: int
    label_refs: list[Any]


@dataclass(frozen=True)
class Encoded:
    """A clip's encode task finished."""

    shard: _Shard
    clip: _Clip


@dataclass(frozen=True)
class Written:
    """A shard's write task finished (committed, or failed)."""

    shard: _Shard


Event = Decoded | Labelled | Encoded | Written


@dataclass(frozen=True)
class Limits:
    """The run's resolved sizes (module docstring, "Backpressure")."""

    actors: int
    decode_workers: int
    max_shards: int  # shards open at once
    max_waiting: int  # decoded clips waiting for a teacher, plus decodes in flight
    teacher_resize: tuple[int, int] | None  # (long side, multiple): teacher frames resized at decode


def write_task_options(cfg: PrecomputeConfig) -> dict[str, Any]:
    """Ray options of the shard write task: it reserves CPUs, so the cluster bounds how many run."""
    return {"num_cpus": cfg.write_cpus, "max_retries": 2}


def check_committed_shards(manifest: Manifest, reader: StoreReader, store: Path) -> None:
    """Refuse to resume when a committed shard holds other clips than the manifest puts in it.

    That happens when the corpus was re-indexed from scratch after videos were added (shards are
    packed by sorted clip id): resuming would skip committed shards whose clip lists no longer
    match and silently leave clips unlabelled. `index --extend OLD_MANIFEST` keeps the old layout.
    """
    clip_ids, by_shard = manifest.clip_ids(), manifest.shard_positions()
    failed: dict[str, set[str]] = {}
    for row in reader.failures():
        failed.setdefault(row["shard_id"], set()).add(row["clip_id"])
    for shard_id in sorted(reader.shards()):
        stored = set(reader.shard_clip_ids(shard_id)) | failed.get(shard_id, set())
        wanted = set(clip_ids[by_shard[shard_id]]) if shard_id in by_shard else set()
        if stored != wanted:
            raise ValueError(
                f"{store}: committed shard {shard_id} holds {len(stored)} clips, the manifest assigns it "
                f"{len(wanted)} ({len(stored - wanted)} not in the manifest's shard, {len(wanted - stored)} "
                "missing): the manifest's shard layout changed since the store was written; re-index with "
                "`geovr-pipeline index ... --extend OLD_MANIFEST` so that committed shards keep their clips"
            )


@dataclass
class RunResult:
    counts: RunCounts
    timings: dict[str, float]
    failure_ratio: float
    store_clips: int
    store_failures: int
    exit_code: int


def keep_ray_on_loopback() -> None:
    """Make Ray in this process, and in the processes it starts, use 127.0.0.1.

    Unless told otherwise Ray rewrites 127.0.0.1 to the host's external address
    (`services.resolve_ip_for_localhost`), so a "local" cluster would listen on the network. The
    switch is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads once, when it is imported: the
    variable serves the processes Ray starts, and this process, which has imported Ray already,
    needs the constant read from it set as well.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(address: str | None, cpus: int | None = None) -> bool:
    """Connect to the cluster at `address` ("local": start one in-process; None: Ray's default).

    Every Ray process stays on loopback for a local cluster, and a watchdog (`driver_watchdog`) ends
    the local cluster's processes within about a second of this driver's end, however it ends
    (SIGKILL included). Returns whether this call started Ray.
    """
    if ray.is_initialized():
        return False
    if address == "local" or (address or "").split(":")[0] in ("127.0.0.1", "localhost"):
        keep_ray_on_loopback()  # not for real clusters: there the driver must advertise a reachable address
    if address == "local":
        start_watchdog()
        ray.init(
            address="local",
            num_cpus=cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level="WARNING",
            log_to_driver=False,
        )
    else:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    return True


# ----------------------------------------------------------------------------------------------
# The run: actors, fingerprint, plan, the scheduler, the records at the end


class Precompute:
    """One precompute run: starts the teacher actors, fingerprints the store, plans the shards, runs
    the `Scheduler` and writes the store's run records (`teacher_cache.records`)."""

    def __init__(
        self,
        manifest: Manifest,
        store: Path,
        teacher: TeacherConfig,
        cfg: PrecomputeConfig,
        console: Console,
        lease: StoreLease,
        retry_failed: bool = False,
        config_record: dict[str, Any] | None = None,
    ) -> None:
        """`lease`: the store lease this run holds (`run_precompute` takes it)."""
        self.manifest = manifest
        self.store = Path(store)
        self.lease = lease
        self.teacher = teacher
        self.cfg = cfg
        self.console = console
        self.retry_failed = retry_failed
        self.config_record = config_record or {}
        self.sampling = SamplingConfig.from_policy(manifest.sampling)
        self.counts = RunCounts()
        self.timings: dict[str, float] = {"decode_s": 0.0, "teacher_s": 0.0, "encode_s": 0.0, "write_s": 0.0}

    # -- setup ---------------------------------------------------------------------------------

    def _num_actors(self) -> int:
        if self.cfg.num_actors:
            return self.cfg.num_actors
        if self.cfg.device == "cpu":
            return 1
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus == 0:
            raise ValueError(
                "--device cuda but the Ray cluster has no GPUs; pass --device cpu or a GPU cluster"
            )
        return gpus

    def _start_actors(self, count: int) -> list[Any]:
        gpu = self.cfg.device == "cuda"
        actor_cls = ray.remote(TeacherActor).options(
            num_gpus=1 if gpu else 0,
            num_cpus=self.cfg.actor_cpus,
            max_restarts=self.cfg.max_actor_restarts,
            max_concurrency=ACTOR_QUEUE,
        )
        threads = max(1, int(self.cfg.actor_cpus))
        return [
            actor_cls.remote(self.teacher, self.cfg.device, self.cfg.max_teacher_frames, threads)
            for _ in range(count)
        ]

    def fingerprint(self, parts: dict[str, Any]) -> StoreFingerprint:
        preprocess = dict(parts["preprocess"])
        preprocess["student_frames"] = {
            "video_max_pixels": self.cfg.video_max_pixels,
            "video_min_pixels": self.cfg.video_min_pixels,
            "rule": "frames.student_frame_size of the kept frames (clip budget, repeat pairing), "
            "displayed orientation, PIL bicubic at decode, JPEG",
            "jpeg_quality": self.cfg.jpeg_quality,
        }
        sources = self.cfg.label_sources()
        if any(
            source != "teacher" for source in sources.values()
        ):  # teacher-only stores keep their fingerprint
            preprocess["ground_truth"] = {**sources, "conventions": GT_CONVENTIONS}
        return StoreFingerprint(
            teacher=parts["teacher"],
            checkpoint_sha256=parts["checkpoint_sha256"],
            teacher_config=parts["teacher_config"],
            metric_teacher=parts["metric_teacher"],
            preprocess=preprocess,
            sampling=self.manifest.sampling,
            feature_layers=tuple(int(x) for x in self.teacher.feature_layers),
            code_version=__version__,
        )

    def _plan(self, writer: Any) -> list[_Shard]:
        """The shards this run labels: uncommitted ones, or with --retry-failed the failed clips of committed ones."""
        committed = set(writer.committed_shards())
        by_shard = self.manifest.shard_positions()
        self.counts.shards_total = len(by_shard)
        reader = open_store(self.store)
        check_committed_shards(self.manifest, reader, self.store)
        shards: list[_Shard] = []
        if self.retry_failed:
            failed = {f["clip_id"] for f in reader.failures()}
            clip_ids = self.manifest.clip_ids()
            for shard_id, positions in by_shard.items():
                if shard_id not in committed:
                    shards.append(_Shard(shard_id, positions))
                    continue
                retry = np.asarray([p for p in positions if clip_ids[p] in failed], dtype=np.int64)
                if len(retry):
                    shards.append(_Shard(shard_id, retry, keep_stored=True))
                else:
                    self.counts.shards_skipped += 1
        else:
            for shard_id, positions in by_shard.items():
                if shard_id in committed:
                    self.counts.shards_skipped += 1
                else:
                    shards.append(_Shard(shard_id, positions))
        self.counts.clips_todo = sum(len(s.positions) for s in shards)
        return shards

    def limits(self, actors: int) -> Limits:
        cfg = self.cfg
        cpus = int(ray.cluster_resources().get("CPU", 1))
        decode_workers = cfg.decode_workers or max(
            1, int((cpus - actors * cfg.actor_cpus) // cfg.decode_cpus)
        )
        # Enough open shards to queue two batches per actor, plus two being encoded and written.
        max_shards = cfg.max_inflight_shards or (
            math.ceil(2 * actors * cfg.clips_per_batch / max(self.manifest.clips_per_shard, 1)) + 2
        )
        # Depth Anything V2 reads the source frames; VGGT and DA3-Metric read the teacher-size ones.
        teacher = self.teacher
        v2 = teacher.metric_checkpoint is not None and teacher.metric_teacher == "depth-anything-v2"
        # The fusion pass (`teacher.fusion_layers`) resizes the source frames to its own size.
        source = v2 or bool(teacher.fusion_layers)
        resize = None if source else (int(teacher.image_long_side), int(teacher.size_multiple))
        return Limits(actors, decode_workers, max_shards, 2 * cfg.clips_per_batch * actors, resize)

    # -- run -----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.perf_counter()
        actors = self._start_actors(self._num_actors())
        try:
            return self._run(actors, started)
        finally:  # also on errors (e.g. a refused fingerprint): free the GPUs of a shared cluster
            for actor in actors:
                ray.kill(actor)

    def _run(self, actors: list[Any], started: float) -> RunResult:
        try:
            parts = ray.get(actors[0].fingerprint_parts.remote())
        except ray.exceptions.RayActorError as err:
            if not getattr(err, "actor_init_failed", False):
                raise
            # The error's last line is the exception the teacher raised; the rest is Ray's traceback.
            raise ValueError(
                f"the teacher actor failed to start: {str(err).strip().splitlines()[-1]}"
            ) from None
        self.timings["actor_startup_s"] = time.perf_counter() - started
        fingerprint = self.fingerprint(parts)
        # Refuses a different fingerprint; removes what killed writers left (under the run's lease).
        writer = open_writer(self.store, fingerprint, self.cfg.format, lease=self.lease)
        shards = self._plan(writer)
        limits = self.limits(len(actors))
        Scheduler(self, actors, writer, limits).run(shards)
        self.timings["wall_s"] = time.perf_counter() - started
        return self._finish(limits)

    def warn(self, message: str) -> None:
        warn_line(self.console, message)

    # -- end of run ----------------------------------------------------------------------------

    def _finish(self, limits: Limits) -> RunResult:
        """`failures.jsonl` and `run.json` (`teacher_cache.records`), the summary table, the result."""
        reader = open_store(self.store)
        failures = reader.failures()
        stored = len(reader.clip_ids())
        total = stored + len(failures)
        ratio = len(failures) / total if total else 0.0
        write_failures(self.store, failures)
        exit_code = 1 if ratio > self.cfg.max_failure_ratio else 0
        counts = self.counts
        resolved = {
            "num_actors": limits.actors,
            "decode_workers": limits.decode_workers,
            "max_inflight_shards": limits.max_shards,
        }
        record = {
            "config": {
                **self.config_record,
                "precompute": to_dict(self.cfg),
                "teacher": to_dict(self.teacher),
                "sampling": self.manifest.sampling,
                "resolved": resolved,
                "retry_failed": self.retry_failed,
            },
            "timings": self.timings,
            "counts": {
                **{k: v for k, v in vars(counts).items()},
                "store_clips": stored,
                "store_failures": len(failures),
                "store_failure_ratio": ratio,
            },
            "exit_code": exit_code,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_run_record(self.store, record)
        self.console.print(summary_table(counts, self.timings, ratio))
        return RunResult(counts, self.timings, ratio, stored, len(failures), exit_code)


# ----------------------------------------------------------------------------------------------
# The scheduler: decode, label, encode and write tasks in flight, one typed event per object ref


class Scheduler:
    """The event loop of one run (module docstring: data flow, batches, backpressure).

    Every object ref the driver waits for maps to its typed event (`Decoded`, `Labelled`, `Encoded`,
    `Written`); `handle` dispatches on the event's type. A clip that cannot be used becomes a
    `ClipFailure` on its shard (`fail`), which the shard's write task commits into the store.
    """

    def __init__(self, run: Precompute, actors: list[Any], writer: StoreWriter, limits: Limits) -> None:
        cfg = run.cfg
        self.run_, self.actors, self.writer, self.limits, self.cfg = run, actors, writer, limits, cfg
        self.counts, self.timings = run.counts, run.timings
        self.decode_task = ray.remote(decode_clip).options(
            num_returns=3, num_cpus=cfg.decode_cpus, max_retries=1
        )
        self.encode_task = ray.remote(encode_labels).options(
            num_returns=2, num_cpus=cfg.decode_cpus, max_retries=1
        )
        self.write_task = ray.remote(write_shard).options(**write_task_options(cfg))
        self.fingerprint_json = writer.fingerprint.to_json()
        sources = cfg.label_sources()
        self.ground_truth = (
            {"corpus_root": str(run.manifest.corpus_root), "sources": sources}
            if any(source != "teacher" for source in sources.values())
            else None
        )
        self.voxel_size = run.sampling.voxel_size if run.sampling.method == "space_aware" else 0.0
        self.queue: deque[_Shard] = deque()
        self.active: list[_Shard] = []
        self.batches: deque[_Batch] = deque()
        self.load = [0] * limits.actors  # batches queued on each actor (at most ACTOR_QUEUE)
        self.pending: dict[Any, Event] = {}
        self.decoding = 0
        self.waiting = 0  # decoded clips whose frames wait for a teacher
        self.teacher_clips = {"finite": 0, "nonfinite": 0}  # clips the teacher returned, by output

    def run(self, shards: list[_Shard]) -> None:
        self.queue.extend(shards)
        progress = PrecomputeProgress(self.run_.console, self.counts, self.limits.actors)
        with progress:
            self.submit_decodes()
            self.submit_writes()  # shards whose clips all failed at indexing
            while self.pending or self.batches or self.queue:
                self.run_.lease.check()  # a run whose lease was taken over stops
                self.dispatch_batches()
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    self.handle(ref, self.pending.pop(ref))
                self.submit_decodes()
                self.submit_writes()
                progress.update(sum(1 for n in self.load if n))

    def handle(self, ref: Any, event: Event) -> None:
        match event:
            case Decoded(shard, clip):
                self.decoding -= 1
                self.on_decoded(ref, shard, clip)
                if clip.state == "decoded":
                    self.waiting += 1
                self.form_batches(shard)
            case Labelled(batch, actor, label_refs):
                self.waiting -= self.on_labelled(ref, batch)
                self.load[actor] -= 1
                for clip, label_ref in zip(batch.clips, label_refs, strict=True):
                    if clip.state == "encoding":
                        status, clip.encoded_ref = self.encode_task.remote(
                            clip.row, clip.info_ref, label_ref, self.writer.codecs, self.ground_truth
                        )
                        clip.info_ref = None  # the encode task holds it until it has run
                        self.pending[status] = Encoded(batch.shard, clip)
            case Encoded(shard, clip):
                self.on_encoded(ref, shard, clip)
            case Written(shard):
                self.on_written(ref, shard)
                self.active.remove(shard)
                shard.clips = []  # written: the dicts of its rows go (the driver's memory stays flat)

    def fail(self, shard: _Shard, clip: _Clip, failure: ClipFailure) -> None:
        clip.state = "failed"
        clip.frames_ref = clip.info_ref = clip.encoded_ref = None
        shard.failures.append(failure)
        self.counts.clips_failed += 1
        stages = self.counts.failures_by_stage
        stages[failure.stage] = stages.get(failure.stage, 0) + 1

    # -- submitting work -----------------------------------------------------------------------

    def form_batches(self, shard: _Shard) -> None:
        """Batch the shard's decoded clips in manifest order once every earlier clip is resolved."""
        while shard.next_to_batch < len(shard.clips):
            clip = shard.clips[shard.next_to_batch]
            if clip.state in ("pending", "decoding"):
                break
            if clip.state == "decoded":
                shard.forming.append(clip)
            shard.next_to_batch += 1
            if len(shard.forming) == self.cfg.clips_per_batch:
                self.batches.append(_Batch(shard, shard.forming))
                shard.forming = []
        if shard.next_to_batch == len(shard.clips) and shard.forming:
            self.batches.append(_Batch(shard, shard.forming))
            shard.forming = []

    def submit_decodes(self) -> None:
        while self.queue and len(self.active) < self.limits.max_shards:
            shard = self.queue.popleft()
            shard.clips = [_Clip(row) for row in self.run_.manifest.take(shard.positions)]
            self.active.append(shard)
            for clip in shard.clips:
                if clip.row["status"] != "ok":
                    self.fail(shard, clip, clip.failure("index", clip.row["reason"] or clip.row["status"]))
            self.form_batches(shard)
        cfg, manifest = self.cfg, self.run_.manifest
        for shard in self.active:
            for clip in shard.clips:
                if (
                    self.decoding >= self.limits.decode_workers
                    or self.waiting + self.decoding >= self.limits.max_waiting
                ):
                    return
                if clip.state != "pending":
                    continue
                status, frames, info = self.decode_task.remote(
                    clip.row["video"], str(manifest.corpus_root), manifest.sampling, cfg.video_max_pixels,
                    cfg.video_min_pixels, cfg.jpeg_quality, self.limits.teacher_resize, cfg.decode_threads(),
                )  # fmt: skip
                clip.state, clip.frames_ref, clip.info_ref = "decoding", frames, info
                self.pending[status] = Decoded(shard, clip)
                self.decoding += 1

    def dispatch_batches(self) -> None:
        while self.batches and min(self.load) < ACTOR_QUEUE:
            batch = self.batches.popleft()
            actor = self.load.index(min(self.load))
            self.load[actor] += 1
            jobs = [
                {
                    "clip_id": c.row["clip_id"],
                    "keep": c.keep,
                    "voxel_size": self.voxel_size,
                    "student_hw": c.student_hw,
                }
                for c in batch.clips
            ]
            refs = (
                self.actors[actor]
                .label.options(num_returns=len(batch.clips) + 1)
                .remote(jobs, *[c.frames_ref for c in batch.clips])
            )
            for c in batch.clips:
                c.state = "labelling"
            self.pending[refs[0]] = Labelled(batch, actor, refs[1:])

    def submit_writes(self) -> None:
        for shard in list(self.active):
            if shard.writing or not shard.complete():
                continue
            ref = self.write_task.remote(
                str(self.run_.store), self.fingerprint_json, self.cfg.format, shard.shard_id,
                [c.encoded_ref for c in shard.clips if c.state == "done"], shard.failures,
                shard.keep_stored, self.run_.lease.token,
            )  # fmt: skip
            shard.writing = True
            self.pending[ref] = Written(shard)

    # -- events --------------------------------------------------------------------------------

    def on_decoded(self, ref: Any, shard: _Shard, clip: _Clip) -> None:
        try:
            status = ray.get(ref)
        except ray.exceptions.RayError as err:  # the worker died (e.g. a decoder crash)
            reason = f"decode task failed: {type(err).__name__}: {str(err)[:300]}"
            self.fail(shard, clip, clip.failure("decode", reason))
            return
        if not status["ok"]:
            self.fail(shard, clip, clip.failure(status["stage"], status["reason"]))
            return
        self.timings["decode_s"] += status["decode_s"]
        clip.state, clip.keep = "decoded", status["keep"]
        clip.student_hw = tuple(status["student_hw"])

    def on_labelled(self, ref: Any, batch: _Batch) -> int:
        """Handle a finished teacher call; returns how many decoded clips left the waiting set."""
        try:
            statuses = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            batch.attempts += 1
            if batch.attempts <= self.cfg.max_actor_restarts:
                for c in batch.clips:
                    c.state = "decoded"
                self.batches.appendleft(batch)
                return 0
            for c in batch.clips:
                self.fail(batch.shard, c, c.failure("teacher", f"teacher actor died: {str(err)[:300]}"))
            return len(batch.clips)
        except ray.exceptions.RayError as err:
            for c in batch.clips:
                self.fail(batch.shard, c, c.failure("teacher", f"{type(err).__name__}: {str(err)[:300]}"))
            return len(batch.clips)
        self.timings["teacher_s"] += statuses[0].get("teacher_s", 0.0)
        for clip, status in zip(batch.clips, statuses, strict=True):
            clip.frames_ref = None  # the frames are no longer needed: let the object store free them
            self.check_teacher_output(clip, status)
            if status["ok"]:
                clip.state = "encoding"
            else:
                self.fail(batch.shard, clip, clip.failure(status["stage"], status["reason"]))
        return len(batch.clips)

    def check_teacher_output(self, clip: _Clip, status: dict[str, Any]) -> None:
        """Non-finite teacher output is said once, at the first clip that has it; the run stops when
        the first `NONFINITE_STOP_CLIPS` clips the teacher returned all have it.

        Why stop: non-finite output from the start almost always means a broken or mismatched
        checkpoint (e.g. a camera head whose field of view is 0), and every clip would fail the same
        way: on a corpus of 100,000 videos that is hours of GPU time spent on failure rows. Why not
        at the first such clip: one pathological video must not stop a run, so a few clips must agree
        (and once any clip came out finite, the run goes on and counts the others as failures).
        """
        counts = self.teacher_clips
        if not status.get("nonfinite"):
            counts["finite"] += int(status["ok"])
            return
        counts["nonfinite"] += 1
        checkpoint = self.run_.teacher.checkpoint
        if counts["nonfinite"] == 1:
            self.run_.warn(
                f"clip {clip.row['clip_id']} ({clip.row['video']}): {status['reason']}; the teacher checkpoint "
                f"{checkpoint} is the likely cause (further clips like this are counted, not reported)"
            )
        if counts["finite"] == 0 and counts["nonfinite"] >= min(NONFINITE_STOP_CLIPS, self.counts.clips_todo):
            raise ValueError(
                f"the teacher's first {counts['nonfinite']} clips all have {status['reason']}; the teacher "
                f"checkpoint {checkpoint} is the likely cause: stopping before labelling the other "
                f"{self.counts.clips_todo - counts['nonfinite']} clips"
            )

    def on_encoded(self, ref: Any, shard: _Shard, clip: _Clip) -> None:
        try:
            status = ray.get(ref)
        except ray.exceptions.RayError as err:
            reason = f"encode task failed: {type(err).__name__}: {str(err)[:300]}"
            self.fail(shard, clip, clip.failure("encode", reason))
            return
        if not status["ok"]:
            self.fail(shard, clip, clip.failure(status["stage"], status["reason"]))
            return
        clip.state = "done"
        self.timings["encode_s"] += status["encode_s"]
        self.counts.clips_ok += 1
        self.counts.frames += status["frames"]
        self.counts.clips_split += int(status["split"])
        self.counts.clips_without_scale += int(not status["scale_valid"])
        self.count_ground_truth(clip, status)

    def count_ground_truth(self, clip: _Clip, status: dict[str, Any]) -> None:
        """Clips labelled from ground truth, and those that fell back to the teacher: counted; a
        damaged RGB-D folder (not a video without one) also gets one warning line."""
        if self.ground_truth is None:
            return
        if not status["gt_fallback"]:
            self.counts.clips_ground_truth += 1
            return
        self.counts.clips_gt_fallback += 1
        if status["gt_problem"]:
            self.run_.warn(
                f"clip {clip.row['clip_id']} ({clip.row['video']}): ground truth unusable, teacher labels "
                f"kept: {status['gt_fallback']}"
            )

    def on_written(self, ref: Any, shard: _Shard) -> None:
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            self.run_.lease.check()  # a lost lease is the cause to report
            raise RuntimeError(
                f"shard {shard.shard_id} could not be written to {self.run_.store}: {err}"
            ) from err
        self.timings["write_s"] += result["write_s"]
        self.counts.shards_written += 1
        for clip in shard.clips:
            clip.encoded_ref = None


def run_precompute(
    manifest_path: Path,
    store: Path,
    teacher: TeacherConfig,
    cfg: PrecomputeConfig,
    ray_address: str | None,
    console: Console,
    retry_failed: bool = False,
    config_record: dict[str, Any] | None = None,
) -> RunResult:
    """Read the manifest, check the teacher settings against the checkpoint, take the store's lease
    (refused while another run writes the store), connect to Ray, run, disconnect (if this call
    connected), give the lease up."""
    from geovr.pipeline.labeler import check_teacher_config

    manifest = read_manifest(manifest_path)
    check_teacher_config(teacher)  # before any actor starts
    what = "precompute --retry-failed" if retry_failed else "precompute"
    with acquire_lease(store, what, warn=lambda message: warn_line(console, message)) as lease:
        started_ray = connect_ray(ray_address)
        try:
            return Precompute(
                manifest, store, teacher, cfg, console, lease, retry_failed, config_record
            ).run()
        finally:
            if started_ray:
                ray.shutdown()
                stop_watchdog()


def warn_line(console: Console, message: str) -> None:
    """One `warning:` line (never wrapped: it is read and matched by line)."""
    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True, highlight=False)
