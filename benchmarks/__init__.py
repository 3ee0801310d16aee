"""dicefn benchmarks: estimator quality and speed, side by side. Run ``python benchmarks/run.py``."""
