"""VSI-style questions from the synthetic corpus: answers checked against the scene files."""

from __future__ import annotations

import cmath
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from geovr.app import commands  # noqa: F401  (registers the CLI commands)
from geovr.app.cli import app
from geovr.corpus.config import SynthConfig
from geovr.corpus.synth import SceneObject, write_corpus
from geovr.eval.config import QuestionConfig
from geovr.eval.questions import (
    SceneAnnotation,
    box_distance,
    generate_questions,
    load_synthetic_scene,
    write_vsi_dataset,
)
from geovr.eval.report import vsibench_summary
from geovr.eval.scoring import NA_QUESTION_TYPES, PARSERS, QUESTION_TYPES, TASKS, score_rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, SynthConfig(scenes=3, frames=24, width=64, height=48, fps=4.0, seed=0))
    return out


@pytest.fixture(scope="module")
def dataset(corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("vsi")
    path = write_vsi_dataset(corpus, out, QuestionConfig(max_per_type=2))
    return out, [json.loads(line) for line in path.read_text().splitlines()]


def _scene(corpus: Path, name: str) -> dict:
    return json.loads((corpus / "gt" / name / "scene.json").read_text())


def _object(scene: dict, category: str) -> dict:
    found = [o for o in scene["objects"] if o["category"] == category]
    assert len(found) == 1, f"{category} is not unique in {scene['scene_id']}"
    return found[0]


def _outline(obj: dict, step: float = 0.005) -> np.ndarray:
    """Points every `step` metres along the object's footprint outline (independent of eval's geometry)."""
    cx, cy = obj["center"][:2]
    dx, dy = obj["size"][:2]
    if obj["shape"] == "cylinder":
        angles = np.linspace(0, 2 * np.pi, max(16, int(np.pi * dx / step)), endpoint=False)
        return np.stack([cx + dx / 2 * np.cos(angles), cy + dx / 2 * np.sin(angles)], -1)
    corners = [(-dx / 2, -dy / 2), (dx / 2, -dy / 2), (dx / 2, dy / 2), (-dx / 2, dy / 2)]
    points = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1], strict=True):
        n = max(2, int(math.hypot(x1 - x0, y1 - y0) / step))
        t = np.linspace(0, 1, n, endpoint=False)[:, None]
        points.append(np.array([x0, y0]) * (1 - t) + np.array([x1, y1]) * t)
    local = np.concatenate(points)
    c, s = math.cos(obj["yaw"]), math.sin(obj["yaw"])
    return local @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])


def _sampled_distance(a: dict, b: dict) -> float:
    """Closest distance of two floor-standing objects from outline samples (an upper bound, +- 5 mm)."""
    pa, pb = _outline(a), _outline(b)
    planar = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min()
    za = (a["center"][2] - a["size"][2] / 2, a["center"][2] + a["size"][2] / 2)
    zb = (b["center"][2] - b["size"][2] / 2, b["center"][2] + b["size"][2] / 2)
    return math.hypot(planar, max(0.0, zb[0] - za[1], za[0] - zb[1]))


def _inside(outer: dict, inner: dict) -> bool:
    """Whether `inner`'s centre lies in `outer`'s footprint and their height intervals overlap."""
    offset = np.array(inner["center"][:2]) - np.array(outer["center"][:2])
    if outer["shape"] == "cylinder":
        planar = np.linalg.norm(offset) <= outer["size"][0] / 2
    else:
        c, s = math.cos(outer["yaw"]), math.sin(outer["yaw"])
        local = np.array([c * offset[0] + s * offset[1], -s * offset[0] + c * offset[1]])
        planar = bool(np.all(np.abs(local) <= np.array(outer["size"][:2]) / 2))
    za, zb = outer["center"][2], inner["center"][2]
    return planar and abs(za - zb) <= (outer["size"][2] + inner["size"][2]) / 2


def _option(row: dict) -> str:
    return next(o for o in row["options"] if o.startswith(row["ground_truth"] + "."))[3:]


def _left_angle(origin, towards, target) -> float:
    """Angle (deg) of `target` seen from `origin` facing `towards`, counter-clockwise (left) positive."""
    o, f, t = (complex(*p["center"][:2]) for p in (origin, towards, target))
    return math.degrees(cmath.phase((t - o) / (f - o)))


def test_all_question_types_are_generated(dataset):
    _, rows = dataset
    counts = Counter(r["question_type"] for r in rows)
    assert set(counts) == set(QUESTION_TYPES)
    assert [r["id"] for r in rows] == list(range(len(rows)))
    for row in rows:
        assert set(row) == {
            "id",
            "dataset",
            "scene_name",
            "question_type",
            "question",
            "options",
            "ground_truth",
        }
        assert (row["options"] is None) == (row["question_type"] in NA_QUESTION_TYPES)


@pytest.mark.parametrize("parser", PARSERS)
def test_ground_truth_answers_score_one_on_every_task(dataset, parser):
    _, rows = dataset
    scored, errors = score_rows([{**r, "prediction": r["ground_truth"]} for r in rows], parser)
    assert errors == []
    scores = vsibench_summary(scored, errors, parser)["scores"]
    assert set(scores) == {key for key, _ in TASKS} | {"overall"}
    assert all(value == 1.0 for value in scores.values()), scores


def test_numerical_answers_agree_with_scene_files(corpus, dataset):
    _, rows = dataset
    checked = Counter()
    for row in rows:
        scene = _scene(corpus, row["scene_name"])
        gt, question = row["ground_truth"], row["question"]
        if row["question_type"] == "object_counting":
            category = re.match(r"How many (.+)\(s\) are in this room\?", question).group(1)
            assert int(gt) == sum(o["category"] == category for o in scene["objects"]) >= 2
        elif row["question_type"] == "object_abs_distance":
            a, b = re.search(r"between the (.+) and the (.+) \(in meters\)", question).groups()
            distance = _sampled_distance(_object(scene, a), _object(scene, b))
            assert abs(float(gt) - distance) <= 0.05 + 0.006, (question, gt, distance)
        elif row["question_type"] == "object_size_estimation":
            category = re.search(r"height\) of the (.+), measured", question).group(1)
            assert int(gt) == round(max(_object(scene, category)["size"]) * 100)
        elif row["question_type"] == "room_size_estimation":
            sx, sy, _ = scene["room"]["size"]
            assert abs(float(gt) - sx * sy) <= 0.05 + 1e-9
        else:
            continue
        checked[row["question_type"]] += 1
    assert len(checked) == 4 and min(checked.values()) >= 2


def test_multiple_choice_answers_agree_with_scene_files(corpus, dataset):
    _, rows = dataset
    checked = Counter()
    for row in rows:
        if row["options"] is None:
            continue
        scene, qtype, answer = _scene(corpus, row["scene_name"]), row["question_type"], _option(row)
        if qtype == "object_rel_distance":
            choices, query = re.search(
                r"which of these objects \((.+)\) is the closest to the (.+)\?", row["question"]
            ).groups()
            target = _object(scene, query)
            dist = {
                c: min(_sampled_distance(target, o) for o in scene["objects"] if o["category"] == c)
                for c in choices.split(", ")
            }
            ranked = sorted(dist, key=dist.get)
            assert answer == ranked[0] and dist[ranked[1]] - dist[ranked[0]] > 0.2
        elif qtype.startswith("object_rel_direction"):
            p, o, q = re.search(
                r"standing by the (.+) and facing the (.+), is the (.+?) to ", row["question"]
            ).groups()
            left = _left_angle(_object(scene, p), _object(scene, o), _object(scene, q))
            side = "left" if left > 0 else "right"
            if qtype.endswith("easy"):
                expected = side
            elif qtype.endswith("medium"):
                expected = "back" if abs(left) >= 135 else side
            else:
                expected = ("front-" if abs(left) < 90 else "back-") + side
            assert answer == expected, (row["question"], left)
        elif qtype == "route_planning":
            start, facing = re.search(
                r"beginning at the (.+?) facing the (.+?)\. You want", row["question"]
            ).groups()
            stops = re.findall(r"Go forward until the (.+?)\.", row["question"])
            assert stops[0] == facing
            route = [_object(scene, c) for c in [start, *stops]]
            turns = []
            for a, b, c in zip(route, route[1:], route[2:], strict=False):
                pa, pb, pc = (complex(*x["center"][:2]) for x in (a, b, c))
                turn = math.degrees(
                    cmath.phase((pc - pb) / (pb - pa))
                )  # from the incoming heading, left positive
                turns.append("Turn Back" if abs(turn) >= 135 else ("Turn Left" if turn > 0 else "Turn Right"))
            assert answer == ", ".join(turns), row["question"]
            assert len(re.findall(r"\d+\. \[please fill in\]", row["question"])) == len(turns)
        elif qtype == "obj_appearance_order":
            visible = load_file(corpus / "gt" / row["scene_name"] / "frames.safetensors")["visible_pixels"]
            threshold = QuestionConfig().min_visible_fraction * 64 * 48
            first = {}
            for obj in scene["objects"]:
                frames = np.flatnonzero(visible[:, obj["id"]] >= threshold)
                if frames.size:
                    first[obj["category"]] = min(first.get(obj["category"], 10**9), int(frames[0]))
            order = answer.split(", ")
            times = [first[c] for c in order]
            assert times == sorted(times) and len(set(times)) == 4, (order, times)
        else:
            continue
        checked[qtype.split("_easy")[0].split("_medium")[0].split("_hard")[0]] += 1
    assert set(checked) == {
        "object_rel_distance",
        "object_rel_direction",
        "route_planning",
        "obj_appearance_order",
    }


def test_box_distance_matches_sampling():
    rng = np.random.default_rng(1)
    for _ in range(40):
        objs = []
        for i in range(2):
            shape = "cylinder" if rng.uniform() < 0.3 else "box"
            size = rng.uniform(0.2, 1.5, 3)
            if shape == "cylinder":
                size[1] = size[0]
            center = np.array([*rng.uniform(0, 3, 2), size[2] / 2 + rng.uniform(0, 1)])
            objs.append(
                {
                    "id": i,
                    "category": "x",
                    "shape": shape,
                    "center": center.tolist(),
                    "size": size.tolist(),
                    "yaw": float(rng.uniform(-3, 3)) if shape == "box" else 0.0,
                }
            )
        boxes = [
            SceneObject(o["id"], o["category"], o["shape"], tuple(o["center"]), tuple(o["size"]), o["yaw"])
            for o in objs
        ]
        exact = box_distance(*boxes)
        sampled = _sampled_distance(*objs)
        if exact > 0:
            assert exact - 1e-9 <= sampled <= exact + 0.006
        else:  # overlapping footprints: the outlines cross, or one footprint holds the other's centre
            assert sampled < 0.006 or _inside(objs[0], objs[1]) or _inside(objs[1], objs[0])


def test_generation_is_deterministic_and_plugs_in_other_annotations(corpus):
    scene = load_synthetic_scene(corpus, "scene_0000")
    cfg = QuestionConfig(max_per_type=2, seed=3)
    assert generate_questions(scene, cfg) == generate_questions(scene, cfg)
    # A ScanNet-like annotation: objects and room area only, no per-frame visibility.
    other = SceneAnnotation(
        dataset="scannet",
        scene_name="scene0000_00",
        objects=[
            SceneObject(0, "chair", "box", (1.0, 1.0, 0.4), (0.5, 0.5, 0.8), 0.0),
            SceneObject(1, "chair", "box", (3.0, 1.0, 0.4), (0.5, 0.5, 0.8), 0.0),
            SceneObject(2, "table", "box", (2.0, 3.0, 0.4), (1.2, 0.8, 0.8), 0.0),
            SceneObject(3, "sofa", "box", (4.0, 4.0, 0.4), (2.0, 0.9, 0.8), 0.0),
            SceneObject(4, "tv", "box", (0.5, 4.5, 1.0), (1.0, 0.1, 0.6), 0.0),
        ],
        room_area=25.0,
    )
    records = generate_questions(other, cfg)
    kinds = Counter(r["question_type"] for r in records)
    assert kinds["object_counting"] == 1 and kinds["room_size_estimation"] == 1
    assert "obj_appearance_order" not in kinds
    assert all(r["dataset"] == "scannet" for r in records)
    with pytest.raises(ValueError, match="unknown question type"):
        generate_questions(other, QuestionConfig(question_types=("object_height",)))


def test_dataset_has_videos(dataset):
    out, rows = dataset
    for scene in {r["scene_name"] for r in rows}:
        assert (out / "synthetic" / f"{scene}.mp4").stat().st_size > 0


def test_cli_questions(corpus, tmp_path):
    out = tmp_path / "vsi"
    result = CliRunner().invoke(
        app, ["eval", "questions", "--corpus", str(corpus), "--out", str(out), "--per-type", "1"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert f"{len(rows)} questions" in result.output
    assert max(Counter((r["scene_name"], r["question_type"]) for r in rows).values()) == 1
