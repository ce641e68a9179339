"""What the non-oracle backends share. Pure PyTorch; imports no backend (backends import it, never each other),
and never the oracle.

    compact.py          the one compact form of a selection (indices padded with L, counts) and its conversions
    block_budgets.py    Eq. 7: how many blocks get each retain count, and t_j = Psi[r_j] without building Psi
    environment.py      TRITON_INTERPRET, read in one place
    protocol.py         the cache contract (KVCache) and decode_step
    packed_cache.py     PackedKVCache: the compressed KV cache every fast backend builds and decodes
    decode_torch.py     a decode step's device work in torch (the default kernels of the cache)
    dense.py            exact dense attention as TCA with dense budgets (backend="auto" below the crossover)
    dense_cache.py      DenseKVCache: that path's cache, every token in one contiguous buffer, exact decode
    chunked_prefill.py  exact and streaming chunked prefill over the PackedKVCache
"""
