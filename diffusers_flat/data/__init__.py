"""Image datasets, shared by training, evaluation and studies."""
