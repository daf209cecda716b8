"""YAML presets (`tiny`, `vggt-1b`, `qwen3vl-2b-geovr`), shipped as package data of `geovr.configs`."""
