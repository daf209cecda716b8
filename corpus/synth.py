"""Procedural indoor scenes with exact ground truth: the built-in corpus of the demo and of every test.

Each scene is a room (a box with textured walls, floor and ceiling, each surface with its own colour
and pattern) holding 3 to 12 pieces of furniture of named categories with plausible sizes in metres
(boxes, some yawed, and vertical cylinders), all standing on the floor without overlapping. A camera
at eye height moves slowly around the middle of the room while sweeping its yaw, never closer than
`CAMERA_CLEARANCE` to an object. Frames are ray cast in numpy (vectorised over pixels and objects),
so depth is exact per pixel, and encoded as H.264 with PyAV.

World frame: z up, metres, floor at z = 0, the room spans `[0, sx] x [0, sy] x [0, sz]`.
Cameras follow `geovr.teacher_cache.geometry`: OpenCV axes (x right, y down, z forward),
camera-from-world extrinsics, pinhole intrinsics with the principal point at (W/2, H/2), pixel (u, v)
cast through coordinate (u, v). Depth is the z coordinate in the camera frame, in metres.

On disk (`write_corpus(out, config)`; `corpus.json` is written last, so its presence marks a
complete corpus):

    DIR/corpus.json                       {"format_version": 1, "scenes": [scene ids], "frames": F,
                                           "size": [W, H], "fps": R, "seed": S}
    DIR/videos/<scene_id>.mp4             H.264 (libx264, yuv420p), F frames at R fps, W x H
    DIR/gt/<scene_id>/scene.json          {"scene_id", "room": {"size": [sx, sy, sz], "origin": [0, 0, 0]},
                                           "objects": [{"id", "category", "shape": "box"|"cylinder",
                                                        "center": [x, y, z], "size": [dx, dy, dz], "yaw"}],
                                           "world": "z up, metres, floor at z=0",
                                           "camera_convention": "OpenCV camera-from-world",
                                           "frames": F, "size": [W, H], "fps": R}
    DIR/gt/<scene_id>/frames.safetensors  extrinsic (F, 3, 4) float64 camera-from-world,
                                          intrinsic (F, 3, 3) float64, timestamps (F,) float64 seconds,
                                          depth (F, H, W) float32 metres,
                                          visible_pixels (F, num_objects) int64 pixels of each object
    DIR/videos/<scene_id>/                the same depth and cameras in the RGB-D layout of
                                          `corpus.rgbd` (depth rounded to the millimetre, poses
                                          camera-to-world, timestamps.txt), beside the video by the
                                          layout's naming rule

An object's `center` is the centre of its bounding box (so `center[2] = size[2] / 2`), `size` its
extent along its own axes before the yaw (for a cylinder: diameter, diameter, height), `yaw` the
rotation about +z in radians (counter-clockwise seen from above). Object `id`s index the columns of
`visible_pixels`. Scene `i` of seed `s` is the same whatever the number of scenes asked for.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.numpy import load_file, save_file

from geovr.corpus.config import SynthConfig
from geovr.corpus.rgbd import rgbd_dir_for, write_rgbd

FORMAT_VERSION = 1
CAMERA_CLEARANCE = 0.5  # metres between the camera path and any object's footprint
OBJECT_GAP = 0.1  # metres between two objects' footprints
WALL_GAP = 0.05  # metres between a footprint and a wall


# ----------------------------------------------------------------------------------------------
# Scene description


@dataclass(frozen=True)
class Category:
    """A furniture category: its shape and the range of its size (dx, dy, dz) in metres."""

    shape: str  # "box" or "cylinder" (dx = dy = diameter)
    size_min: tuple[float, float, float]
    size_max: tuple[float, float, float]
    against_wall: bool  # usually stands with its back to a wall


CATEGORIES: dict[str, Category] = {
    "chair": Category("box", (0.42, 0.42, 0.80), (0.55, 0.55, 1.00), False),
    "table": Category("box", (0.80, 0.60, 0.70), (1.60, 1.00, 0.78), False),
    "sofa": Category("box", (1.60, 0.80, 0.75), (2.30, 1.00, 0.90), True),
    "bed": Category("box", (1.40, 1.90, 0.45), (1.80, 2.10, 0.60), True),
    "tv": Category("box", (0.90, 0.10, 0.55), (1.40, 0.15, 0.85), True),
    "lamp": Category("cylinder", (0.25, 0.25, 1.40), (0.40, 0.40, 1.70), False),
    "cabinet": Category("box", (0.60, 0.40, 0.80), (1.20, 0.60, 2.00), True),
    "plant": Category("cylinder", (0.30, 0.30, 0.50), (0.60, 0.60, 1.20), False),
    "bookshelf": Category("box", (0.60, 0.25, 1.50), (1.00, 0.35, 2.00), True),
    "desk": Category("box", (1.00, 0.50, 0.72), (1.40, 0.70, 0.76), True),
    "stool": Category("cylinder", (0.30, 0.30, 0.45), (0.40, 0.40, 0.70), False),
    "refrigerator": Category("box", (0.60, 0.60, 1.60), (0.80, 0.75, 1.90), True),
    "trash can": Category("cylinder", (0.25, 0.25, 0.30), (0.35, 0.35, 0.50), False),
}


@dataclass(frozen=True)
class SceneObject:
    """One piece of furniture; see the module docstring for the meaning of each field."""

    id: int
    category: str
    shape: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float

    @property
    def xy(self) -> np.ndarray:
        """(2,) the centre on the floor plane."""
        return np.asarray(self.center[:2], dtype=np.float64)

    def footprint(self) -> np.ndarray:
        """(4, 2) corners of the floor rectangle (a cylinder's bounding square), counter-clockwise."""
        half = np.asarray(self.size[:2], dtype=np.float64) / 2
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * half
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return corners @ np.array([[c, s], [-s, c]]) + self.xy

    def height_interval(self) -> tuple[float, float]:
        return float(self.center[2] - self.size[2] / 2), float(self.center[2] + self.size[2] / 2)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "category": self.category,
            "shape": self.shape,
            "center": list(self.center),
            "size": list(self.size),
            "yaw": self.yaw,
        }


@dataclass(frozen=True)
class Room:
    """The room box: `size` (sx, sy, sz) in metres from `origin` (its corner at floor level)."""

    size: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Material:
    """A procedural texture: two colours (RGB in [0, 1]) mixed by a pattern of `period` metres."""

    pattern: str  # "checker", "stripes", "noise", "planks" or "tiles"
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    period: float
    seed: int


@dataclass
class Scene:
    """A generated scene: geometry, materials and the camera path (F frames)."""

    scene_id: str
    room: Room
    objects: list[SceneObject]
    surface_materials: list[Material]  # 6 room surfaces: x=0, x=sx, y=0, y=sy, floor, ceiling
    object_materials: list[Material]
    extrinsic: np.ndarray  # (F, 3, 4) float64 camera-from-world
    intrinsic: np.ndarray  # (F, 3, 3) float64
    timestamps: np.ndarray  # (F,) float64 seconds
    image_size: tuple[int, int]  # (W, H)
    fps: float


@dataclass
class SceneGT:
    """A scene's ground truth as written on disk (see the module docstring)."""

    scene_id: str
    room: Room
    objects: list[SceneObject]
    extrinsic: np.ndarray  # (F, 3, 4) float64
    intrinsic: np.ndarray  # (F, 3, 3) float64
    timestamps: np.ndarray  # (F,) float64
    depth: np.ndarray  # (F, H, W) float32
    visible_pixels: np.ndarray  # (F, num_objects) int64
    video: Path
    fps: float
    meta: dict = field(default_factory=dict)  # scene.json as read


def scene_id_for(index: int) -> str:
    return f"scene_{index:04d}"


def generate_scene(config: SynthConfig, index: int) -> Scene:
    """Scene `index` of `config.seed`: room, objects, materials and camera path (deterministic)."""
    rng = np.random.default_rng([config.seed, index])
    room = Room(
        size=(
            round(float(rng.uniform(4.5, 8.0)), 3),
            round(float(rng.uniform(4.0, 7.0)), 3),
            round(float(rng.uniform(2.5, 3.2)), 3),
        )
    )
    path = _camera_path(rng, room, config.frames)
    objects = _place_objects(rng, room, path["position"], config.min_objects, config.max_objects)
    hue0 = rng.uniform()
    surface_materials = [_room_material(rng, surface, (hue0 + 0.17 * surface) % 1.0) for surface in range(6)]
    object_materials = [_object_material(rng) for _ in objects]
    extrinsic, intrinsic = _cameras(rng, path, config.width, config.height)
    return Scene(
        scene_id=scene_id_for(index),
        room=room,
        objects=objects,
        surface_materials=surface_materials,
        object_materials=object_materials,
        extrinsic=extrinsic,
        intrinsic=intrinsic,
        timestamps=np.arange(config.frames, dtype=np.float64) / config.fps,
        image_size=(config.width, config.height),
        fps=config.fps,
    )


def _camera_path(rng: np.random.Generator, room: Room, frames: int) -> dict[str, np.ndarray]:
    """A smooth path around the room's middle: positions (F, 3) and yaw/pitch/roll (F,) in radians.

    The path is parameterised by the clip's progress s in [0, 1], so a clip of any length covers
    the same sweep: a slow Lissajous drift of the position and a yaw sweep of 1 to 1.2 turns, so
    that every wall (and every object that nothing hides) is seen.
    """
    sx, sy, _ = room.size
    s = np.arange(frames, dtype=np.float64) / max(frames - 1, 1)
    phase = rng.uniform(0, 2 * math.pi, size=6)
    center = np.array([sx / 2 + rng.uniform(-0.1, 0.1) * sx, sy / 2 + rng.uniform(-0.1, 0.1) * sy])
    amplitude = np.array([0.12 * sx, 0.12 * sy])
    x = center[0] + amplitude[0] * np.sin(2 * math.pi * 0.7 * s + phase[0])
    y = center[1] + amplitude[1] * np.sin(2 * math.pi * 0.5 * s + phase[1])
    z = rng.uniform(1.35, 1.65) + 0.03 * np.sin(2 * math.pi * 1.5 * s + phase[2])
    sweep = rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 1.2) * 2 * math.pi
    yaw = rng.uniform(0, 2 * math.pi) + sweep * s + 0.2 * np.sin(2 * math.pi * s + phase[3])
    pitch = rng.uniform(-0.3, -0.12) + 0.06 * np.sin(2 * math.pi * s + phase[4])
    roll = 0.02 * np.sin(2 * math.pi * 1.3 * s + phase[5])
    position = np.stack((x, y, np.broadcast_to(z, s.shape)), -1)
    return {"position": position, "yaw": yaw, "pitch": pitch, "roll": roll}


def _cameras(
    rng: np.random.Generator, path: dict[str, np.ndarray], width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Camera-from-world extrinsics (F, 3, 4) and intrinsics (F, 3, 3) along the path."""
    yaw, pitch, roll = path["yaw"], path["pitch"], path["roll"]
    forward = np.stack((np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)), -1)
    up = np.array([0.0, 0.0, 1.0])
    right = np.cross(forward, up)
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    down = np.cross(forward, right)
    # Roll turns right and down about the forward axis.
    cos_r, sin_r = np.cos(roll)[:, None], np.sin(roll)[:, None]
    right, down = cos_r * right + sin_r * down, -sin_r * right + cos_r * down
    world_from_camera = np.stack((right, down, forward), -1)  # columns are the camera axes
    rotation = world_from_camera.transpose(0, 2, 1)
    translation = -(rotation @ path["position"][..., None])
    extrinsic = np.concatenate((rotation, translation), -1)

    fov_w = math.radians(rng.uniform(60.0, 75.0))
    focal = (width / 2) / math.tan(fov_w / 2)
    intrinsic = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    return extrinsic, np.broadcast_to(intrinsic, (len(yaw), 3, 3)).copy()


def _place_objects(
    rng: np.random.Generator, room: Room, camera_centers: np.ndarray, min_objects: int, max_objects: int
) -> list[SceneObject]:
    """3 to 12 objects on the floor, apart from each other, the walls and the camera path."""
    sx, sy, _ = room.size
    names = list(CATEGORIES)
    target = int(rng.integers(min_objects, max_objects + 1))
    placed: list[SceneObject] = []
    footprints: list[np.ndarray] = []  # corners (4, 2) of each placed object
    for _ in range(400):
        if len(placed) == target:
            break
        name = names[int(rng.integers(len(names)))]
        category = CATEGORIES[name]
        size = rng.uniform(category.size_min, category.size_max)
        if category.shape == "cylinder":
            size[1] = size[0]
        size = np.round(size, 3)
        if category.against_wall and rng.uniform() < 0.8:
            # Back to a wall: the object's +y axis points into the room.
            wall = int(rng.integers(4))
            yaw = (0.0, math.pi / 2, math.pi, -math.pi / 2)[wall]
            along = sx if wall in (0, 2) else sy
            t = rng.uniform(size[0] / 2 + WALL_GAP, along - size[0] / 2 - WALL_GAP)
            depth = size[1] / 2 + WALL_GAP
            xy = {0: (t, depth), 1: (sx - depth, t), 2: (t, sy - depth), 3: (depth, t)}[wall]
        else:
            yaw = 0.0 if category.shape == "cylinder" else float(rng.uniform(-math.pi, math.pi))
            radius = 0.5 * math.hypot(size[0], size[1])
            xy = (rng.uniform(radius, sx - radius), rng.uniform(radius, sy - radius))
        center = np.array(xy, dtype=np.float64)
        corners = _footprint(center, size[:2], yaw)
        if corners[:, 0].min() < WALL_GAP - 1e-9 or corners[:, 0].max() > sx - WALL_GAP + 1e-9:
            continue
        if corners[:, 1].min() < WALL_GAP - 1e-9 or corners[:, 1].max() > sy - WALL_GAP + 1e-9:
            continue
        if (
            _footprint_distance(camera_centers[:, :2], center, size[:2], yaw, category.shape)
            < CAMERA_CLEARANCE
        ):
            continue
        if any(_footprints_overlap(corners, other, OBJECT_GAP) for other in footprints):
            continue
        footprints.append(corners)
        placed.append(
            SceneObject(
                id=len(placed),
                category=name,
                shape=category.shape,
                center=(round(float(center[0]), 4), round(float(center[1]), 4), float(size[2]) / 2),
                size=(float(size[0]), float(size[1]), float(size[2])),
                yaw=yaw,
            )
        )
    if len(placed) < min_objects:
        raise ValueError(
            f"could only place {len(placed)} of synth.min_objects={min_objects} objects in a {sx}x{sy} m room; "
            "lower synth.min_objects"
        )
    return placed


def _footprint(center: np.ndarray, size_xy: np.ndarray, yaw: float) -> np.ndarray:
    """The 4 corners (4, 2) of a yawed rectangle on the floor (a cylinder's bounding square)."""
    half = np.asarray(size_xy) / 2
    local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    c, s = math.cos(yaw), math.sin(yaw)
    return local @ np.array([[c, s], [-s, c]]) + center


def _footprints_overlap(a: np.ndarray, b: np.ndarray, gap: float) -> bool:
    """Whether two convex footprints (4, 2) come closer than `gap` (separating axis test)."""
    for poly in (a, b):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            normal = np.array([-edge[1], edge[0]]) / np.linalg.norm(edge)
            pa, pb = a @ normal, b @ normal
            if pa.max() + gap <= pb.min() or pb.max() + gap <= pa.min():
                return False
    return True


def _footprint_distance(
    points: np.ndarray, center: np.ndarray, size_xy: np.ndarray, yaw: float, shape: str
) -> float:
    """Smallest distance from points (N, 2) to an object's footprint, in metres."""
    offset = points - center
    if shape == "cylinder":
        return float(max((np.linalg.norm(offset, axis=-1) - size_xy[0] / 2).min(), 0.0))
    c, s = math.cos(yaw), math.sin(yaw)
    local = offset @ np.array([[c, -s], [s, c]])
    outside = np.maximum(np.abs(local) - np.asarray(size_xy) / 2, 0.0)
    return float(np.linalg.norm(outside, axis=-1).min())


def _hsv(hue: float, saturation: float, value: float) -> tuple[float, float, float]:
    i = int(hue * 6) % 6
    f = hue * 6 - math.floor(hue * 6)
    p, q, t = value * (1 - saturation), value * (1 - f * saturation), value * (1 - (1 - f) * saturation)
    r, g, b = ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q))[i]
    return (r, g, b)


def _room_material(rng: np.random.Generator, surface: int, hue: float) -> Material:
    if surface == 4:  # floor
        pattern = str(rng.choice(["planks", "tiles", "checker"]))
        period = float(rng.uniform(0.3, 0.6))
    elif surface == 5:  # ceiling
        pattern, period = "tiles", float(rng.uniform(0.5, 0.8))
    else:
        pattern = str(rng.choice(["stripes", "noise", "checker", "tiles"]))
        period = float(rng.uniform(0.2, 0.5))
    saturation = float(rng.uniform(0.25, 0.6))
    value = float(rng.uniform(0.55, 0.9))
    return Material(
        pattern=pattern,
        color_a=_hsv(hue, saturation, value),
        color_b=_hsv((hue + rng.uniform(0.05, 0.15)) % 1.0, saturation * 0.8, value * 0.55),
        period=period,
        seed=int(rng.integers(2**31)),
    )


def _object_material(rng: np.random.Generator) -> Material:
    hue = float(rng.uniform())
    saturation = float(rng.uniform(0.4, 0.9))
    value = float(rng.uniform(0.5, 0.95))
    return Material(
        pattern=str(rng.choice(["checker", "stripes", "noise"])),
        color_a=_hsv(hue, saturation, value),
        color_b=_hsv((hue + 0.5) % 1.0, saturation, value * 0.5),
        period=float(rng.uniform(0.08, 0.25)),
        seed=int(rng.integers(2**31)),
    )


# ----------------------------------------------------------------------------------------------
# Ray casting. Arrays of rays and points are laid out component-major, (3, N), so that every
# operation runs over contiguous rows.


@dataclass
class Frame:
    """One rendered frame: rgb (H, W, 3) uint8, depth (H, W) float32 metres, object_id (H, W) int16
    (-1 where a room surface is seen), visible_pixels (num_objects,) int64."""

    rgb: np.ndarray
    depth: np.ndarray
    object_id: np.ndarray
    visible_pixels: np.ndarray


def render_frame(scene: Scene, index: int) -> Frame:
    """Ray cast frame `index` of `scene`: one ray per pixel through integer coordinates (u, v)."""
    width, height = scene.image_size
    extrinsic, intrinsic = scene.extrinsic[index], scene.intrinsic[index]
    rotation = extrinsic[:, :3]
    origin = -rotation.T @ extrinsic[:, 3]
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    x_cam = ((u - intrinsic[0, 2]) / intrinsic[0, 0]).ravel()
    y_cam = ((v - intrinsic[1, 2]) / intrinsic[1, 1]).ravel()
    # World directions of camera rays (x, y, 1): the ray parameter of a hit is its depth.
    rays = np.stack([rotation[0, i] * x_cam + rotation[1, i] * y_cam + rotation[2, i] for i in range(3)])
    rays[rays == 0.0] = 1e-12

    room_depth, surface = _hit_room(origin, rays, np.asarray(scene.room.size))
    object_depth, object_index, object_normal, object_uv = _hit_objects(origin, rays, scene.objects)
    on_object = object_depth < room_depth
    depth = np.where(on_object, object_depth, room_depth)
    object_index[~on_object] = -1
    points = origin[:, None] + depth * rays

    # Texture coordinates and normals: room surfaces first, objects overwrite where they are seen.
    axis = surface // 2
    uv = np.stack((np.where(axis == 0, points[1], points[0]), np.where(axis == 2, points[1], points[2])))
    sign = np.where(surface % 2 == 0, 1.0, -1.0)
    normal = np.stack([np.where(axis == i, sign, 0.0) for i in range(3)])
    uv[:, on_object] = object_uv[:, on_object]
    normal[:, on_object] = object_normal[:, on_object]

    albedo = np.empty((3, len(depth)), dtype=np.float32)
    for surface_id, material in enumerate(scene.surface_materials):
        pixels = np.flatnonzero(~on_object & (surface == surface_id))
        albedo[:, pixels] = _texture(material, uv[:, pixels].astype(np.float32))
    for k, material in enumerate(scene.object_materials):
        pixels = np.flatnonzero(object_index == k)
        albedo[:, pixels] = _texture(material, uv[:, pixels].astype(np.float32))

    # A point light under the ceiling centre plus ambient light.
    sx, sy, sz = scene.room.size
    to_light = np.array([sx / 2, sy / 2, sz - 0.2])[:, None] - points
    distance = np.sqrt((to_light * to_light).sum(0))
    lambert = np.clip((normal * to_light).sum(0) / distance, 0.0, 1.0)
    shade = (0.35 + 0.75 * lambert / (1.0 + 0.08 * distance * distance)).astype(np.float32)
    rgb = np.clip(albedo * (shade * 255.0) + 0.5, 0, 255).astype(np.uint8)

    visible = np.bincount(object_index[on_object], minlength=len(scene.objects)).astype(np.int64)
    return Frame(
        rgb=np.ascontiguousarray(rgb.T).reshape(height, width, 3),
        depth=depth.reshape(height, width).astype(np.float32),
        object_id=object_index.reshape(height, width).astype(np.int16),
        visible_pixels=visible,
    )


def render_scene(scene: Scene) -> Iterator[Frame]:
    """The frames of `scene` in order."""
    for index in range(len(scene.extrinsic)):
        yield render_frame(scene, index)


def _argmin3(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.where(a <= b, np.where(a <= c, 0, 2), np.where(b <= c, 1, 2))


def _hit_room(origin: np.ndarray, rays: np.ndarray, room_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance (N,) of rays (3, N) from inside the room box and the surface (N,) they hit.

    Surfaces: 0 x=0, 1 x=sx, 2 y=0, 3 y=sy, 4 floor, 5 ceiling.
    """
    positive = rays > 0
    # Per axis, the distance to the plane the ray moves towards.
    t = [(np.where(positive[i], room_size[i], 0.0) - origin[i]) / rays[i] for i in range(3)]
    axis = _argmin3(*t)
    distance = np.minimum(np.minimum(t[0], t[1]), t[2])
    towards_max = np.where(axis == 0, positive[0], np.where(axis == 1, positive[1], positive[2]))
    return distance, 2 * axis + towards_max


def _hit_objects(
    origin: np.ndarray, rays: np.ndarray, objects: list[SceneObject]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest object hit per ray (rays (3, N)): distance (N,) (inf if none), object index (N,)
    (-1 if none), world normal (3, N) and texture coordinates (2, N) in metres on the face hit."""
    n = rays.shape[1]
    best = np.full(n, np.inf)
    best_index = np.full(n, -1, dtype=np.int64)
    normal = np.zeros((3, n))
    uv = np.zeros((2, n))
    ray_norm2 = (rays * rays).sum(0)
    for k, obj in enumerate(objects):
        # Only rays passing through the object's bounding sphere can hit it.
        to_center = np.asarray(obj.center) - origin
        along = to_center @ rays
        radius2 = 0.25 * float(np.dot(obj.size, obj.size))
        candidates = np.flatnonzero(float(to_center @ to_center) - along * along / ray_norm2 <= radius2)
        if len(candidates) == 0:
            continue
        hit = _hit_cylinder if obj.shape == "cylinder" else _hit_box
        distance, obj_normal, obj_uv = hit(origin, rays[:, candidates], obj)
        closer = distance < best[candidates]
        rows = candidates[closer]
        best[rows] = distance[closer]
        best_index[rows] = k
        normal[:, rows] = obj_normal[:, closer]
        uv[:, rows] = obj_uv[:, closer]
    return best, best_index, normal, uv


def _hit_box(
    origin: np.ndarray, rays: np.ndarray, obj: SceneObject
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slab test of rays (3, N) against a yawed box: distance (N,) (inf on a miss), normal (3, N), uv (2, N)."""
    c, s = math.cos(obj.yaw), math.sin(obj.yaw)
    half = np.asarray(obj.size) / 2
    offset = origin - np.asarray(obj.center)
    o = (c * offset[0] + s * offset[1], -s * offset[0] + c * offset[1], offset[2])  # object axes
    d = (c * rays[0] + s * rays[1], -s * rays[0] + c * rays[1], rays[2])
    near, far = [], []
    for i in range(3):
        t1 = (-half[i] - o[i]) / d[i]
        t2 = (half[i] - o[i]) / d[i]
        near.append(np.minimum(t1, t2))
        far.append(np.maximum(t1, t2))
    t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
    t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
    hit = (t_near <= t_far) & (t_near > 0)
    distance = np.where(hit, t_near, np.inf)

    axis = _argmin3(-near[0], -near[1], -near[2])  # the face the ray enters through
    entry = [o[i] + t_near * d[i] for i in range(3)]  # in object axes, from the box centre
    on_axis = np.where(axis == 0, entry[0], np.where(axis == 1, entry[1], entry[2]))
    sign = np.where(on_axis > 0, 1.0, -1.0)
    n_local = [np.where(axis == i, sign, 0.0) for i in range(3)]
    normal = np.stack((c * n_local[0] - s * n_local[1], s * n_local[0] + c * n_local[1], n_local[2]))
    # Texture coordinates: the two in-face axes, measured from the box corner.
    corner = [entry[i] + half[i] for i in range(3)]
    uv = np.stack((np.where(axis == 0, corner[1], corner[0]), np.where(axis == 2, corner[1], corner[2])))
    return distance, normal, uv


def _hit_cylinder(
    origin: np.ndarray, rays: np.ndarray, obj: SceneObject
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rays (3, N) against a vertical cylinder standing on the floor: its side and its top disc."""
    radius, height = obj.size[0] / 2, obj.size[2]
    o = origin - np.array([obj.center[0], obj.center[1], 0.0])
    dx, dy, dz = rays
    a = dx * dx + dy * dy
    b = 2 * (o[0] * dx + o[1] * dy)
    c = o[0] ** 2 + o[1] ** 2 - radius**2
    disc = b * b - 4 * a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
    z_side = o[2] + t_side * dz
    side_hit = (disc >= 0) & (t_side > 0) & (z_side >= 0) & (z_side <= height)
    t_top = (height - o[2]) / dz
    top_x, top_y = o[0] + t_top * dx, o[1] + t_top * dy
    top_hit = (t_top > 0) & (top_x * top_x + top_y * top_y <= radius**2)
    t_side = np.where(side_hit, t_side, np.inf)
    t_top = np.where(top_hit, t_top, np.inf)
    on_top = t_top < t_side
    distance = np.minimum(t_side, t_top)

    t = np.where(np.isfinite(distance), distance, 0.0)
    px, py, pz = o[0] + t * dx, o[1] + t * dy, o[2] + t * dz
    normal = np.stack(
        (np.where(on_top, 0.0, px / radius), np.where(on_top, 0.0, py / radius), on_top.astype(np.float64))
    )
    around = (np.arctan2(py, px) + math.pi) * radius
    uv = np.stack((np.where(on_top, px + radius, around), np.where(on_top, py + radius, pz)))
    return distance, normal, uv


# ----------------------------------------------------------------------------------------------
# Procedural textures (float32: colour needs no more)


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-random value in [0, 1) per integer lattice point (uint32 arithmetic)."""
    h = ix.view(np.uint32) * np.uint32(374761393) + iy.view(np.uint32) * np.uint32(668265263)
    h += np.uint32((seed * 982451653) & 0xFFFFFFFF)
    h ^= h >> np.uint32(13)
    h *= np.uint32(1274126177)
    h ^= h >> np.uint32(16)
    return h.astype(np.float32) * np.float32(2.0**-32)


def _value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth lattice noise in [0, 1) with one lattice cell per unit of x and y."""
    fx, fy = np.floor(x), np.floor(y)
    ix, iy = fx.astype(np.int32), fy.astype(np.int32)
    tx, ty = x - fx, y - fy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    n00, n10 = _hash01(ix, iy, seed), _hash01(ix + 1, iy, seed)
    n01, n11 = _hash01(ix, iy + 1, seed), _hash01(ix + 1, iy + 1, seed)
    return (n00 + (n10 - n00) * tx) * (1 - ty) + (n01 + (n11 - n01) * tx) * ty


def _fractal_noise(x: np.ndarray, y: np.ndarray, seed: int, octaves: int = 3) -> np.ndarray:
    total, weight, norm = np.zeros_like(x), 1.0, 0.0
    for octave in range(octaves):
        scale = np.float32(2.0**octave)
        total += np.float32(weight) * _value_noise(x * scale, y * scale, seed + octave)
        norm += weight
        weight *= 0.5
    return total / np.float32(norm)


def _texture(material: Material, uv: np.ndarray) -> np.ndarray:
    """Albedo (3, N) float32 in [0, 1] of a material at surface coordinates uv (2, N) in metres."""
    a, b = uv / np.float32(material.period)
    seed = material.seed
    if material.pattern == "checker":
        mix = ((np.floor(a) + np.floor(b)) % 2) * 0.8 + 0.2 * _value_noise(4 * a, 4 * b, seed)
    elif material.pattern == "stripes":
        mix = (
            0.5
            + 0.35 * np.sin(np.float32(2 * math.pi) * a)
            + 0.15 * (_fractal_noise(3 * a, 3 * b, seed) - 0.5)
        )
    elif material.pattern == "noise":
        mix = _fractal_noise(2 * a, 2 * b, seed)
    elif material.pattern == "planks":
        plank = np.floor(b)
        grain = _fractal_noise(0.5 * a + 7.3 * plank, 8 * b, seed)
        board = _hash01(plank.astype(np.int32), np.floor(a / 4 + plank).astype(np.int32), seed)
        mix = np.where(b - plank < 0.04, 1.0, 0.6 * grain + 0.4 * board)
    elif material.pattern == "tiles":
        ia, ib = np.floor(a), np.floor(b)
        tile = 0.25 * _hash01(ia.astype(np.int32), ib.astype(np.int32), seed) + 0.2 * _value_noise(
            6 * a, 6 * b, seed
        )
        mix = np.where(((a - ia) < 0.06) | ((b - ib) < 0.06), 1.0, tile)
    else:
        raise ValueError(f"unknown texture pattern {material.pattern!r}")
    # Fine grain on every surface gives features to match between views.
    mix = np.clip(mix, 0.0, 1.0).astype(np.float32)
    grain = 0.85 + 0.3 * _value_noise(uv[0] * np.float32(20), uv[1] * np.float32(20), seed + 101)
    color_a = np.asarray(material.color_a, dtype=np.float32)[:, None]
    color_b = np.asarray(material.color_b, dtype=np.float32)[:, None]
    return np.clip((color_a + (color_b - color_a) * mix) * grain, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Writing and reading a corpus


def write_scene(scene: Scene, out: Path, crf: int = 18, on_frame=None) -> None:
    """Render `scene`, encode its video and write its ground truth under `out` (see module docstring)."""
    width, height = scene.image_size
    frames = len(scene.extrinsic)
    video_path = out / "videos" / f"{scene.scene_id}.mp4"
    gt_dir = out / "gt" / scene.scene_id
    video_path.parent.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)

    depth = np.empty((frames, height, width), dtype=np.float32)
    visible = np.empty((frames, len(scene.objects)), dtype=np.int64)
    partial = video_path.with_name(f".{video_path.name}.partial")
    with VideoWriter(partial, width, height, scene.fps, crf) as writer:
        for index, frame in enumerate(render_scene(scene)):
            writer.write(frame.rgb)
            depth[index] = frame.depth
            visible[index] = frame.visible_pixels
            if on_frame is not None:
                on_frame()
    os.replace(partial, video_path)

    save_file(
        {
            "extrinsic": np.ascontiguousarray(scene.extrinsic, dtype=np.float64),
            "intrinsic": np.ascontiguousarray(scene.intrinsic, dtype=np.float64),
            "timestamps": scene.timestamps.astype(np.float64),
            "depth": depth,
            "visible_pixels": visible,
        },
        str(gt_dir / "frames.safetensors"),
    )
    scene_json = {
        "scene_id": scene.scene_id,
        "room": {"size": list(scene.room.size), "origin": list(scene.room.origin)},
        "objects": [obj.to_json() for obj in scene.objects],
        "world": "z up, metres, floor at z=0",
        "camera_convention": "OpenCV camera-from-world",
        "frames": frames,
        "size": [width, height],
        "fps": scene.fps,
    }
    (gt_dir / "scene.json").write_text(json.dumps(scene_json, indent=1))
    write_rgbd(rgbd_dir_for(video_path), depth, scene.extrinsic, scene.intrinsic[0], scene.timestamps)


class VideoWriter:
    """H.264 (libx264, yuv420p) mp4 writer for RGB frames (H, W, 3) uint8 at a constant frame rate."""

    def __init__(self, path: Path, width: int, height: int, fps: float, crf: int = 18) -> None:
        self.rate = Fraction(fps).limit_denominator(100000)
        self.container = av.open(str(path), mode="w", format="mp4")
        # Options must be given here: assigned to `stream.options` later, PyAV 18 ignores them for the
        # first stream of a process. x264's macroblock tree makes the output vary from run to run
        # (measured with one thread too); without it the same frames always give the same file.
        options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
        self.stream = self.container.add_stream("libx264", rate=self.rate, options=options)
        self.stream.width = width
        self.stream.height = height
        self.stream.pix_fmt = "yuv420p"
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts = self.count
        frame.time_base = 1 / self.rate
        self.count += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.container.close()


def write_corpus(out: str | Path, config: SynthConfig, progress: bool = False) -> list[str]:
    """Generate, render and write `config.scenes` scenes under `out`; returns the scene ids.

    Raises ValueError (naming the path) when `out` cannot be created.
    """
    config.validate()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output directory {out}: {err.strerror or err}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"output directory {out} is not writable")
    corpus_json = out / "corpus.json"
    corpus_json.unlink(missing_ok=True)

    scene_ids = []
    columns = (
        TextColumn("synth {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("", total=config.scenes * config.frames)
        for index in range(config.scenes):
            scene = generate_scene(config, index)
            bar.update(task, description=scene.scene_id)
            write_scene(scene, out, config.crf, on_frame=lambda: bar.advance(task))
            scene_ids.append(scene.scene_id)

    corpus = {
        "format_version": FORMAT_VERSION,
        "scenes": scene_ids,
        "frames": config.frames,
        "size": [config.width, config.height],
        "fps": config.fps,
        "seed": config.seed,
    }
    corpus_json.write_text(json.dumps(corpus, indent=1))
    return scene_ids


def render_probe(
    seed: int = 0, scenes: int = 2, frames: int = 4, width: int = 112, height: int = 84
) -> np.ndarray:
    """(scenes, frames, height, width, 3) uint8 RGB frames of rendered rooms (no video written): the
    calibration frames of the tiny metric teacher (`geovr.teachers.tiny.write_tiny_da3_metric`),
    at its size by default. Scene i of `seed` is the corpus's scene i of that seed."""
    cfg = SynthConfig(scenes=scenes, frames=frames, width=width, height=height, seed=seed)
    return np.stack(
        [
            np.stack([frame.rgb for frame in render_scene(generate_scene(cfg, index))])
            for index in range(scenes)
        ]
    )


def read_corpus(path: str | Path) -> dict:
    """`corpus.json` of a corpus directory; ValueError if it is missing or of another format."""
    corpus_json = Path(path) / "corpus.json"
    if not corpus_json.is_file():
        raise ValueError(f"{corpus_json} not found: not a complete synthetic corpus")
    corpus = json.loads(corpus_json.read_text())
    if corpus.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{corpus_json}: format_version {corpus.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return corpus


def load_scene_gt(path: str | Path, scene_id: str) -> SceneGT:
    """The ground truth of one scene of the corpus at `path`."""
    path = Path(path)
    gt_dir = path / "gt" / scene_id
    scene_json = gt_dir / "scene.json"
    if not scene_json.is_file():
        raise ValueError(f"{scene_json} not found: no scene {scene_id!r} in {path}")
    meta = json.loads(scene_json.read_text())
    arrays = load_file(str(gt_dir / "frames.safetensors"))
    objects = [
        SceneObject(
            id=int(o["id"]),
            category=str(o["category"]),
            shape=str(o.get("shape", "box")),
            center=tuple(float(x) for x in o["center"]),
            size=tuple(float(x) for x in o["size"]),
            yaw=float(o["yaw"]),
        )
        for o in meta["objects"]
    ]
    return SceneGT(
        scene_id=meta["scene_id"],
        room=Room(size=tuple(meta["room"]["size"]), origin=tuple(meta["room"]["origin"])),
        objects=objects,
        extrinsic=arrays["extrinsic"],
        intrinsic=arrays["intrinsic"],
        timestamps=arrays["timestamps"],
        depth=arrays["depth"],
        visible_pixels=arrays["visible_pixels"],
        video=path / "videos" / f"{scene_id}.mp4",
        fps=float(meta["fps"]),
        meta=meta,
    )
