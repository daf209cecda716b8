"""Progress display and end-of-run summary of the precompute (rich).

The live line shows clips done out of the clips this run has to label, clips/s and frames/s over
this run, teacher actors busy, failures and the ETA at the current rate. On a non-terminal
(logs of a batch job) rich prints nothing live; `log_every_s` then prints a plain status line at
that interval so a job log still shows progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table


@dataclass
class RunCounts:
    """Counters of one precompute run (this invocation only, except the `store_*` totals)."""

    shards_total: int = 0
    shards_skipped: int = 0  # committed before this run
    shards_written: int = 0
    clips_todo: int = 0
    clips_ok: int = 0
    clips_failed: int = 0
    frames: int = 0  # frames labelled (kept frames of stored clips)
    clips_split: int = 0
    clips_without_scale: int = 0  # stored with scale_valid False (no metric teacher, or too few pixels)
    clips_ground_truth: int = 0  # ground-truth label source: clips whose chosen fields came from RGB-D
    clips_gt_fallback: int = 0  # ground-truth label source: clips without usable RGB-D, teacher labels kept
    failures_by_stage: dict[str, int] = field(default_factory=dict)


class PrecomputeProgress:
    """Live progress of a precompute run; `update()` after every event, cheap when nothing changed."""

    def __init__(
        self, console: Console, counts: RunCounts, num_actors: int, log_every_s: float = 30.0
    ) -> None:
        self.console = console
        self.counts = counts
        self.num_actors = num_actors
        self.started = time.monotonic()
        self.log_every_s = log_every_s
        self._last_log = self.started
        self._live = console.is_terminal
        self._progress = Progress(
            TextColumn("[bold]precompute"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            disable=not self._live,
            transient=False,
        )
        self._task = self._progress.add_task("", total=counts.clips_todo, stats="")

    def __enter__(self) -> PrecomputeProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def stats_line(self, actors_busy: int) -> str:
        c = self.counts
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = c.clips_ok + c.clips_failed
        clips_rate, frames_rate = done / elapsed, c.frames / elapsed
        remaining = c.clips_todo - done
        eta = f"{remaining / clips_rate:,.0f}s" if clips_rate > 0 and remaining > 0 else "-"
        return (
            f"{clips_rate:.2f} clips/s  {frames_rate:.1f} frames/s  actors busy {actors_busy}/{self.num_actors}  "
            f"failed {c.clips_failed}  shards {c.shards_written + c.shards_skipped}/{c.shards_total}  ETA {eta}"
        )

    def update(self, actors_busy: int) -> None:
        c = self.counts
        line = self.stats_line(actors_busy)
        self._progress.update(self._task, completed=c.clips_ok + c.clips_failed, stats=line)
        now = time.monotonic()
        if not self._live and now - self._last_log >= self.log_every_s:
            self._last_log = now
            self.console.print(f"precompute {c.clips_ok + c.clips_failed}/{c.clips_todo} clips  {line}")


def summary_table(counts: RunCounts, timings: dict[str, float], failure_ratio: float) -> Table:
    """The end-of-run table: shards, clips, frames, failures by stage, throughput, time."""
    table = Table(title="precompute summary", show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    wall = max(timings.get("wall_s", 0.0), 1e-9)
    done = counts.clips_ok + counts.clips_failed
    rows = [
        (
            "shards written / skipped (committed before) / total",
            f"{counts.shards_written} / {counts.shards_skipped} / {counts.shards_total}",
        ),
        ("clips stored", f"{counts.clips_ok}"),
        ("clips failed", f"{counts.clips_failed}"),
        *((f"  failed at {stage}", f"{n}") for stage, n in sorted(counts.failures_by_stage.items())),
        ("clips split for the teacher", f"{counts.clips_split}"),
        ("clips without a metric scale", f"{counts.clips_without_scale}"),
        ("frames labelled", f"{counts.frames}"),
        ("store failure ratio", f"{failure_ratio:.3f}"),
        ("clips/s", f"{done / wall:.2f}"),
        ("frames/s", f"{counts.frames / wall:.1f}"),
        ("teacher actor startup (s)", f"{timings.get('actor_startup_s', 0.0):.1f}"),
        ("teacher busy (actor-seconds)", f"{timings.get('teacher_s', 0.0):.1f}"),
        ("decode (task-seconds)", f"{timings.get('decode_s', 0.0):.1f}"),
        ("encode (task-seconds)", f"{timings.get('encode_s', 0.0):.1f}"),
        ("write (task-seconds)", f"{timings.get('write_s', 0.0):.1f}"),
        ("wall time (s)", f"{timings.get('wall_s', 0.0):.1f}"),
    ]
    if counts.clips_ground_truth or counts.clips_gt_fallback:  # a run with a ground-truth label source
        ground_truth = f"{counts.clips_ground_truth} / {counts.clips_gt_fallback}"
        after = next(i for i, (name, _) in enumerate(rows) if name == "clips without a metric scale")
        rows.insert(after + 1, ("clips with ground-truth labels / teacher fallback", ground_truth))
    for name, value in rows:
        table.add_row(name, value)
    return table
