"""Training machinery: recipes, corpora and datasets, tokenizers, the optimizer and its schedule, evaluation, the
metrics file, checkpoints and resume, data parallel, signals, scaling-sweep runs, process settings."""
