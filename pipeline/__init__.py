"""geovr.pipeline: the CLI, configs, corpus indexing, video decoding, teachers and the Ray precompute driver."""
