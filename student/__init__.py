"""geovr.student: the Qwen3-VL student with GeoVR's geometric tokens and heads, its data, trainer and export."""
