"""The quality harness behind `python -m tca eval` (see docs/quality.md).

- corpus: real text shipped with Python, split into disjoint calibration and evaluation parts;
- tasks: RULER-style needle and variable-tracing prompts of exact token lengths, and their scoring;
- methods: dense, calibrated and fixed-budget TCA, switched on one model (through tca.models);
- harness: generation, perplexity, JSON results; report: tables and target checks; plots: PNG figures;
- presets: the method lists and grids docs/quality.md reports; tiny: a random model for smoke runs.

Nothing here imports transformers or matplotlib at import time.
"""
