"""Benchmarks of fastiaa against the authors' algorithms; run each as python -m bench.<script> from the repo root."""
