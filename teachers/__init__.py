"""geovr.teachers: the frozen 3D teachers (VGGT; DA3-Metric and Depth Anything V2 for the metric scale) and their tiny checkpoints."""
