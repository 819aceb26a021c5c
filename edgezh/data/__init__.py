"""Data: corpora read from installed packages, dataset formats, mixing, encoding."""
