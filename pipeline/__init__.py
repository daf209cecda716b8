"""geovr.pipeline: stage 1: corpus indexing, the teacher labeler and metric-scale fit, and the Ray precompute driver."""
