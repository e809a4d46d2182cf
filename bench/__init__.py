"""Benchmarks of the rmoe layer and of training steps: ``python -m bench`` (``make bench``)."""
