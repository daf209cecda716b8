"""geovr.app: the composition root: the `geovr-pipeline` CLI, its commands, preset loading and the demo."""
