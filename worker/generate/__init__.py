"""Generation: the pipeline of one job (sample, encode, store, manifest), the dynamic batcher, the inference thread
that runs merged forward passes, image encoding and WebDataset shards."""
