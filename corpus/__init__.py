"""geovr.corpus: video probing, decoding and frame sampling, and the synthetic scene corpus (renderer, reader, scene types)."""
