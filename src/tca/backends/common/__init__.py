"""What the non-oracle backends share: the compressed KV cache (the cache contract) and its torch decode step.

Nothing here imports a backend (torch, triton, flash) or the oracle; backends import this.
"""
