"""geovr.student: the Qwen3-VL student with GeoVR's geometric tokens, heads and objectives table, its data, trainer (`training/`) and export."""
