"""Frozen 3D teachers: VGGT (poses, depth, features) and a metric-depth model (scale)."""
