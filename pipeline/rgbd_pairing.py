"""`index`: pairing each video with its RGB-D folder (`corpus.rgbd`) and checking that they match.

The folder of a video is the one its QA rows name under `"rgbd"` (relative to the corpus root),
else the naming rule (`corpus.rgbd.rgbd_dir_for`: the sibling folder named by the video's stem).
A folder is paired when its frames are the video's: the same frame count, and (with its
`timestamps.txt`) each time within half a frame of the video's presentation time. Otherwise the
manifest keeps the video with `rgbd` = "" and says why in `rgbd_status`; precompute then labels it
with the teacher only.

Manifest columns: `rgbd` (corpus-relative folder, "" when none), `rgbd_status` ("paired", "none",
or the problem, e.g. "scannet/scene0000_00: 5578 RGB-D frames for 5577 video frames").
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from geovr.corpus.rgbd import RGBDError, is_rgbd_dir, read_rgbd, rgbd_dir_for
from geovr.corpus.video import VideoError, read_timestamps


def check_pairing(folder: Path, video: Path, num_frames: int) -> str:
    """ "paired", or the reason the RGB-D `folder` does not match the video (`num_frames` probed)."""
    try:
        scene = read_rgbd(folder)
    except RGBDError as err:
        return str(err)
    if scene.num_frames != num_frames:
        return f"{folder}: {scene.num_frames} RGB-D frames for {num_frames} video frames"
    if scene.timestamps is None:
        return "paired"
    try:
        _, seconds = read_timestamps(video)
    except VideoError as err:
        return f"{video}: timestamps unreadable ({err})"
    if len(seconds) != scene.num_frames:
        return f"{folder}: {scene.num_frames} RGB-D frames for {len(seconds)} decoded video frames"
    period = float(np.median(np.diff(seconds))) if len(seconds) > 1 else np.inf
    gap = float(np.abs(scene.timestamps - seconds).max())
    if gap > 0.5 * period:
        return f"{folder / 'timestamps.txt'}: differs from the video's timestamps by up to {gap:.3f} s"
    return "paired"


def pair_rgbd(rows: list[dict[str, Any]], corpus_root: Path, explicit: dict[str, str]) -> dict[str, Any]:
    """Set `rgbd` and `rgbd_status` on every manifest row (probed columns present); `explicit`:
    video -> folder named by its QA rows. Returns `IndexReport`'s rgbd_counts ({paired, none,
    mismatch}: videos) and rgbd_problems ([{"video", "problem"}] of the mismatches)."""
    counts: Counter[str] = Counter()
    for row in rows:
        video = corpus_root / row["video"]
        folder = corpus_root / explicit[row["video"]] if row["video"] in explicit else rgbd_dir_for(video)
        row["rgbd"], row["rgbd_status"] = "", "none"
        if not is_rgbd_dir(folder):
            if row["video"] in explicit:
                row["rgbd_status"] = f"{folder}: not an RGB-D folder (no depth/ and pose/)"
                counts["mismatch"] += 1
            else:
                counts["none"] += 1
            continue
        if row["status"] != "ok":
            counts["none"] += 1
            continue
        row["rgbd_status"] = check_pairing(folder, video, int(row["num_frames"]))
        if row["rgbd_status"] == "paired":
            row["rgbd"] = (
                folder.relative_to(corpus_root).as_posix()
                if folder.is_relative_to(corpus_root)
                else str(folder)
            )
            counts["paired"] += 1
        else:
            counts["mismatch"] += 1
    problems = [
        {"video": r["video"], "problem": r["rgbd_status"]}
        for r in rows
        if r["rgbd_status"] not in ("paired", "none")
    ]
    return {"rgbd_counts": dict(counts), "rgbd_problems": problems}
