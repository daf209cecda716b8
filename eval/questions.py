"""VSI-Bench-style questions generated from scenes with 3D ground truth.

Input: a `SceneAnnotation` per scene, the only thing a new data source has to provide:
- `objects`: one `SceneObject` (`geovr.corpus.synth`'s scene type) per object instance: `category`, `shape` ("box", or "cylinder" with
  size = (diameter, diameter, height)), `center` (x, y, z) of its bounding box in metres, `size`
  (full extents along the object's own x, y, z axes, metres) and `yaw` (rotation about the world z
  axis, counter-clockwise seen from above, radians). World: z up, metres, floor at z = 0.
- `room_area`: floor area of the room in m^2 (for ScanNet-like data: the area of the floor outline).
- `visible_pixels` (F, N): pixels of each object visible in each video frame (column n = objects[n])
  and `frame_pixels` = W * H. Only appearance order uses these.
`load_synthetic_scene` builds it from the synthetic corpus with the corpus's own reader
(`geovr.corpus.synth.load_scene_gt`); a ScanNet-like loader builds it from an
object list (category, oriented box) plus per-frame instance masks.

Questions use VSI-Bench's templates and answer conventions, and are kept only when the answer is
unambiguous by a margin (`QuestionConfig`), so that ground-truth answers are checkable from the
geometry alone:
- object_counting: instances of a category (categories with at least `min_count` instances).
- object_abs_distance: closest-point distance of two objects, metres, 1 decimal. Objects are upright
  prisms (footprint rectangle or disc x height interval), so the distance is exactly
  sqrt(d_footprint^2 + d_height^2).
- object_size_estimation: longest box dimension, centimetres, rounded to an integer.
- room_size_estimation: `room_area`, m^2, 1 decimal.
- object_rel_distance: which of 2-4 categories is closest to a query object (closest instance).
- object_rel_direction_{easy,medium,hard}: standing at the centre of object P facing object O, where
  is object Q (all on the floor plane; angle a of Q measured from the facing direction, positive to
  the right). easy: left (a < 0) / right; medium: back if |a| > 135 deg, else left / right; hard:
  front/back by |a| < 90 deg, then left / right. Rejected within `direction_margin_deg` of a boundary.
- obj_appearance_order: order of the first frame in which each of 4 categories has at least
  `min_visible_pixels` visible pixels; first appearances must be `min_order_gap_frames` apart.
- route_planning (our documented, verifiable version): the robot starts at object P0 facing P1,
  goes forward to P1, turns, goes forward to P2, ... until Pn. Each turn is the signed angle b from
  the previous leg to the next (positive = left): "turn left" for b in (m, 135 - m), "turn right"
  for b in (-(135 - m), -m), "turn back" for |b| > 135 + m (m = `direction_margin_deg`); routes
  with any other turn are rejected. The question lists "Go forward until the <Pi>" steps with a
  "[please fill in]" step at each turn; the options are turn sequences ("Turn Left, Turn Back").

Records follow VSI-Bench: id, dataset, scene_name, question_type, question, options (list of
"A. ..." strings, or None for numerical questions), ground_truth (the letter, or the number as text).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geovr.corpus.synth import SceneObject, load_scene_gt
from geovr.eval.config import QuestionConfig

LETTERS = "ABCD"


@dataclass
class SceneAnnotation:
    """Everything the generator reads about one scene (see the module docstring)."""

    dataset: str
    scene_name: str
    objects: list[SceneObject]
    room_area: float
    visible_pixels: np.ndarray | None = None
    frame_pixels: int = 0


# ---------------------------------------------------------------------------------------------
# Geometry


def _segment_point_distance(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-18), 0.0, 1.0))
    return float(np.linalg.norm(a + t * ab - p))


def _polygons_overlap(p: np.ndarray, q: np.ndarray) -> bool:
    """Separating-axis test for two convex polygons (K, 2)."""
    for poly in (p, q):
        edges = np.roll(poly, -1, axis=0) - poly
        for nx, ny in np.stack([-edges[:, 1], edges[:, 0]], axis=1):
            axis = np.array([nx, ny])
            pp, qq = p @ axis, q @ axis
            if pp.max() < qq.min() or qq.max() < pp.min():
                return False
    return True


def polygon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Smallest distance between two convex polygons (K, 2); 0 when they overlap."""
    if _polygons_overlap(p, q):
        return 0.0
    best = math.inf
    for poly, other in ((p, q), (q, p)):
        for a, b in zip(poly, np.roll(poly, -1, axis=0), strict=True):
            for point in other:
                best = min(best, _segment_point_distance(a, b, point))
    return best


def _point_polygon_distance(point: np.ndarray, poly: np.ndarray) -> float:
    """Distance from a point to a convex counter-clockwise polygon (K, 2); 0 inside."""
    edges = np.roll(poly, -1, axis=0) - poly
    to_point = point - poly
    if np.all(edges[:, 0] * to_point[:, 1] - edges[:, 1] * to_point[:, 0] >= 0):
        return 0.0
    return min(
        _segment_point_distance(a, b, point) for a, b in zip(poly, np.roll(poly, -1, axis=0), strict=True)
    )


def footprint_distance(a: SceneObject, b: SceneObject) -> float:
    """Smallest distance between two objects' floor footprints (rectangles or discs), metres."""
    if a.shape == "cylinder" and b.shape == "cylinder":
        gap = np.linalg.norm(a.xy - b.xy) - (a.size[0] + b.size[0]) / 2
        return max(0.0, float(gap))
    if a.shape == "cylinder" or b.shape == "cylinder":
        disc, box = (a, b) if a.shape == "cylinder" else (b, a)
        return max(0.0, _point_polygon_distance(disc.xy, box.footprint()) - disc.size[0] / 2)
    return polygon_distance(a.footprint(), b.footprint())


def box_distance(a: SceneObject, b: SceneObject) -> float:
    """Closest-point distance of two upright objects, metres (0 when they touch or overlap)."""
    footprint = footprint_distance(a, b)
    (a0, a1), (b0, b1) = a.height_interval(), b.height_interval()
    vertical = max(0.0, b0 - a1, a0 - b1)
    return math.hypot(footprint, vertical)


def direction_angle(standing: np.ndarray, facing: np.ndarray, query: np.ndarray) -> float:
    """Angle of `query` seen from `standing` while facing `facing`, degrees in (-180, 180], + = right.

    Points are (x, y) floor coordinates of a z-up right-handed world (left of heading h is
    (-h_y, h_x)).
    """
    forward = facing - standing
    to_query = query - standing
    right = np.array([forward[1], -forward[0]])
    return math.degrees(math.atan2(float(np.dot(to_query, right)), float(np.dot(to_query, forward))))


def turn_angle(previous: np.ndarray, current: np.ndarray, nxt: np.ndarray) -> float:
    """Signed turn at `current` from leg previous->current to leg current->nxt, degrees, + = left."""
    h, g = current - previous, nxt - current
    return math.degrees(math.atan2(float(h[0] * g[1] - h[1] * g[0]), float(np.dot(h, g))))


def classify_direction(angle: float, level: str, margin: float) -> str | None:
    """VSI-Bench's answer for a direction angle (+ = right), or None within `margin` of a boundary."""
    a = abs(angle)
    side = "right" if angle > 0 else "left"
    if level == "easy":
        return side if margin <= a <= 180 - margin else None
    if level == "medium":
        if a < margin or abs(a - 135) < margin:
            return None
        return "back" if a > 135 else side
    if level == "hard":
        if a < margin or abs(a - 90) < margin or a > 180 - margin:
            return None
        return ("front-" if a < 90 else "back-") + side
    raise ValueError(f"unknown direction level {level!r}")


def classify_turn(angle: float, margin: float) -> str | None:
    """'Turn Left' / 'Turn Right' / 'Turn Back' for a signed turn (+ = left), None if ambiguous."""
    a = abs(angle)
    if margin < a < 135 - margin:
        return "Turn Left" if angle > 0 else "Turn Right"
    if a > 135 + margin:
        return "Turn Back"
    return None


# ---------------------------------------------------------------------------------------------
# Question builders: each returns a list of (question_type, question, options, ground_truth)


def _by_category(scene: SceneAnnotation) -> dict[str, list[SceneObject]]:
    groups: dict[str, list[SceneObject]] = {}
    for obj in scene.objects:
        groups.setdefault(obj.category, []).append(obj)
    return groups


def _unique_objects(scene: SceneAnnotation) -> list[SceneObject]:
    return [objs[0] for objs in _by_category(scene).values() if len(objs) == 1]


def _choice(options: list[str], correct: str, rng: np.random.Generator) -> tuple[list[str], str]:
    """Shuffled lettered options containing `correct`; returns (options, letter)."""
    order = [options[i] for i in rng.permutation(len(options))]
    return [f"{LETTERS[i]}. {text}" for i, text in enumerate(order)], LETTERS[order.index(correct)]


def _sample(items: list[Any], k: int, rng: np.random.Generator) -> list[Any]:
    return [items[i] for i in rng.permutation(len(items))[:k]]


def counting_questions(scene, cfg, rng):
    groups = [(cat, objs) for cat, objs in sorted(_by_category(scene).items()) if len(objs) >= cfg.min_count]
    return [
        ("object_counting", f"How many {cat}(s) are in this room?", None, str(len(objs)))
        for cat, objs in _sample(groups, cfg.max_per_type, rng)
    ]


def abs_distance_questions(scene, cfg, rng):
    pairs = [
        (a, b, d)
        for a, b in itertools.combinations(_unique_objects(scene), 2)
        if (d := box_distance(a, b)) >= cfg.min_distance_m
    ]
    return [
        (
            "object_abs_distance",
            "Measuring from the closest point of each object, what is the direct distance between the "
            f"{a.category} and the {b.category} (in meters)?",
            None,
            f"{d:.1f}",
        )
        for a, b, d in _sample(pairs, cfg.max_per_type, rng)
    ]


def size_questions(scene, cfg, rng):
    return [
        (
            "object_size_estimation",
            "What is the length of the longest dimension (length, width, or height) of the "
            f"{obj.category}, measured in centimeters?",
            None,
            str(round(float(max(obj.size)) * 100)),
        )
        for obj in _sample(_unique_objects(scene), cfg.max_per_type, rng)
    ]


def room_size_questions(scene, cfg, rng):
    return [
        (
            "room_size_estimation",
            "What is the size of this room (in square meters)? "
            "If multiple rooms are shown, estimate the size of the combined space.",
            None,
            f"{scene.room_area:.1f}",
        )
    ]


def rel_distance_questions(scene, cfg, rng):
    groups = _by_category(scene)
    out = []
    for query in _sample(_unique_objects(scene), len(scene.objects), rng):
        others = [cat for cat in sorted(groups) if cat != query.category]
        if len(others) < 2:
            continue
        choices = _sample(others, 4, rng)
        dist = {cat: min(box_distance(query, obj) for obj in groups[cat]) for cat in choices}
        ranked = sorted(choices, key=dist.__getitem__)
        if dist[ranked[1]] - dist[ranked[0]] < cfg.rel_distance_margin_m:
            continue
        listed = ", ".join(choices)
        question = (
            f"Measuring from the closest point of each object, which of these objects ({listed}) is the "
            f"closest to the {query.category}?\n"
            "If there are multiple instances of an object category, measure to the closest."
        )
        options, letter = _choice(choices, ranked[0], rng)
        out.append(("object_rel_distance", question, options, letter))
        if len(out) == cfg.max_per_type:
            break
    return out


_DIRECTION = {
    "easy": (
        "is the {q} to the left or the right of the {o}?",
        ["left", "right"],
    ),
    "medium": (
        "is the {q} to my left, right, or back?\n"
        "An object is to my back if I would have to turn at least 135 degrees in order to face it.",
        ["left", "right", "back"],
    ),
    "hard": (
        "is the {q} to my front-left, front-right, back-left, or back-right?\n"
        "The directions refer to the quadrants of a Cartesian plane "
        "(if I am standing at the origin and facing along the positive y-axis).",
        ["front-left", "front-right", "back-left", "back-right"],
    ),
}


def direction_questions(level: str):
    def build(scene, cfg, rng):
        objs = _unique_objects(scene)
        template, answers = _DIRECTION[level]
        out = []
        for i in rng.permutation(len(objs) * len(objs) * len(objs)) if objs else []:
            p, o, q = objs[i // (len(objs) ** 2)], objs[(i // len(objs)) % len(objs)], objs[i % len(objs)]
            if len({p.id, o.id, q.id}) < 3:
                continue
            sp, so, sq = p.xy, o.xy, q.xy
            if min(np.linalg.norm(so - sp), np.linalg.norm(sq - sp)) < cfg.min_direction_distance_m:
                continue
            answer = classify_direction(direction_angle(sp, so, sq), level, cfg.direction_margin_deg)
            if answer is None:
                continue
            question = (
                f"If I am standing by the {p.category} and facing the {o.category}, "
                + template.format(q=q.category, o=o.category)
            )
            options, letter = _choice(answers, answer, rng)
            out.append((f"object_rel_direction_{level}", question, options, letter))
            if len(out) == cfg.max_per_type:
                break
        return out

    return build


def first_appearances(scene: SceneAnnotation, min_visible_fraction: float) -> dict[str, int]:
    """First frame index in which each category is visible (>= the pixel threshold), per category."""
    if scene.visible_pixels is None:
        return {}
    threshold = max(1.0, min_visible_fraction * scene.frame_pixels)
    first: dict[str, int] = {}
    for column, obj in enumerate(scene.objects):
        frames = np.flatnonzero(scene.visible_pixels[:, column] >= threshold)
        if frames.size:
            first[obj.category] = min(first.get(obj.category, frames[0]), int(frames[0]))
    return first


def appearance_order_questions(scene, cfg, rng):
    first = first_appearances(scene, cfg.min_visible_fraction)
    out = []
    for _ in range(20 * cfg.max_per_type):
        if len(first) < 4 or len(out) == cfg.max_per_type:
            break
        cats = _sample(sorted(first), 4, rng)
        times = sorted(first[c] for c in cats)
        if min(b - a for a, b in itertools.pairwise(times)) < cfg.min_order_gap_frames:
            continue
        correct = sorted(cats, key=first.__getitem__)
        wrong = [p for p in itertools.permutations(correct) if list(p) != correct]
        orders = [", ".join(correct)] + [", ".join(p) for p in _sample(wrong, 3, rng)]
        question = (
            "What will be the first-time appearance order of the following categories in the video: "
            f"{', '.join(cats)}?"
        )
        options, letter = _choice(orders, orders[0], rng)
        if question not in {q for _, q, _, _ in out}:
            out.append(("obj_appearance_order", question, options, letter))
    return out


def route_turns(points: list[np.ndarray], margin: float) -> list[str] | None:
    """Turns at points[1:-1] of a route through floor points, or None if any is ambiguous."""
    turns = [
        classify_turn(turn_angle(a, b, c), margin)
        for a, b, c in zip(points, points[1:], points[2:], strict=False)
    ]
    return None if any(t is None for t in turns) else turns


def route_questions(scene, cfg, rng):
    objs = _unique_objects(scene)
    out = []
    for _ in range(50 * cfg.max_per_type):
        n_turns = int(rng.integers(1, cfg.max_route_turns + 1))
        if len(objs) < n_turns + 2 or len(out) == cfg.max_per_type:
            break
        route = _sample(objs, n_turns + 2, rng)
        points = [obj.xy for obj in route]
        if min(np.linalg.norm(b - a) for a, b in itertools.pairwise(points)) < cfg.min_direction_distance_m:
            continue
        turns = route_turns(points, cfg.direction_margin_deg)
        if turns is None:
            continue
        steps, k = [], 1
        for i, obj in enumerate(route[1:]):
            if i > 0:
                steps.append(f"{k}. [please fill in]")
                k += 1
            steps.append(f"{k}. Go forward until the {obj.category}.")
            k += 1
        question = (
            f"You are a robot beginning at the {route[0].category} facing the {route[1].category}. "
            f"You want to navigate to the {route[-1].category}. You will perform the following actions "
            "(Note: for each [please fill in], choose either 'turn back,' 'turn left,' or 'turn right.'): "
            + " ".join(steps)
            + " You have reached the final destination."
        )
        sequences = [
            list(s) for s in itertools.product(["Turn Left", "Turn Right", "Turn Back"], repeat=n_turns)
        ]
        wrong = [", ".join(s) for s in sequences if s != turns]
        correct = ", ".join(turns)
        options, letter = _choice([correct, *_sample(wrong, 3, rng)], correct, rng)
        if question not in {q for _, q, _, _ in out}:
            out.append(("route_planning", question, options, letter))
    return out


BUILDERS = {
    "object_counting": counting_questions,
    "object_abs_distance": abs_distance_questions,
    "object_size_estimation": size_questions,
    "room_size_estimation": room_size_questions,
    "object_rel_distance": rel_distance_questions,
    "object_rel_direction_easy": direction_questions("easy"),
    "object_rel_direction_medium": direction_questions("medium"),
    "object_rel_direction_hard": direction_questions("hard"),
    "obj_appearance_order": appearance_order_questions,
    "route_planning": route_questions,
}


def generate_questions(scene: SceneAnnotation, cfg: QuestionConfig) -> list[dict[str, Any]]:
    """VSI-Bench records (without `id`) for one scene, deterministic in (cfg.seed, scene name)."""
    unknown = [t for t in cfg.question_types if t not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown question type(s) {', '.join(unknown)}; known: {', '.join(BUILDERS)}")
    records = []
    for qtype in cfg.question_types:
        rng = np.random.default_rng([cfg.seed, zlib.crc32(f"{scene.scene_name}/{qtype}".encode())])
        for question_type, question, options, answer in BUILDERS[qtype](scene, cfg, rng):
            records.append(
                {
                    "dataset": scene.dataset,
                    "scene_name": scene.scene_name,
                    "question_type": question_type,
                    "question": question,
                    "options": options,
                    "ground_truth": answer,
                }
            )
    return records


# ---------------------------------------------------------------------------------------------
# The synthetic corpus as a VSI-Bench directory


def load_synthetic_scene(corpus_dir: Path, scene_id: str, dataset: str = "synthetic") -> SceneAnnotation:
    """A scene of the synthetic corpus, read by the corpus's own reader (`corpus.synth.load_scene_gt`)."""
    gt = load_scene_gt(corpus_dir, scene_id)
    objects = sorted(gt.objects, key=lambda o: o.id)
    if gt.visible_pixels.shape[1] != len(objects) or [o.id for o in objects] != list(range(len(objects))):
        raise ValueError(
            f"{corpus_dir}/gt/{scene_id}: visible_pixels {gt.visible_pixels.shape} does not match the ids of "
            f"{len(objects)} objects"
        )
    sx, sy, _ = gt.room.size
    return SceneAnnotation(
        dataset=dataset,
        scene_name=scene_id,
        objects=objects,
        room_area=float(sx * sy),
        visible_pixels=gt.visible_pixels,
        frame_pixels=int(gt.depth.shape[1] * gt.depth.shape[2]),
    )


def write_vsi_dataset(
    corpus_dir: Path, out_dir: Path, cfg: QuestionConfig | None = None, dataset: str = "synthetic"
) -> Path:
    """Questions over every scene of a synthetic corpus, as a local VSI-Bench directory.

    Writes `out_dir/test.jsonl` (one record a line, ids 0..N-1) and `out_dir/<dataset>/<scene>.mp4`
    (hard links to the corpus videos, copies across file systems). Returns the jsonl path.
    """
    cfg = cfg or QuestionConfig()
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    index = json.loads((corpus_dir / "corpus.json").read_text())
    (out_dir / dataset).mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for scene_id in index["scenes"]:
        scene = load_synthetic_scene(corpus_dir, scene_id, dataset)
        records.extend(generate_questions(scene, cfg))
        video, target = corpus_dir / "videos" / f"{scene_id}.mp4", out_dir / dataset / f"{scene_id}.mp4"
        target.unlink(missing_ok=True)
        try:
            os.link(video, target)
        except OSError:
            shutil.copy2(video, target)
    path = out_dir / "test.jsonl"
    with path.open("w") as f:
        for i, record in enumerate(records):
            f.write(json.dumps({"id": i, **record}) + "\n")
    return path
