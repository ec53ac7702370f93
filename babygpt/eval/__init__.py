"""Evaluations on standard benchmarks, framework-free; the backends supply the model scores."""
