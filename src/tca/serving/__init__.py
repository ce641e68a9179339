"""Serving-engine integrations of TCA-Attention (each imports its engine lazily; `import tca` imports none)."""
