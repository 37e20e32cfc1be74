"""Training machinery: corpora and datasets, tokenizers, checkpoints, the optimizer, process settings."""
