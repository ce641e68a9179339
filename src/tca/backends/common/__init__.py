"""What the non-oracle backends share. Imports no backend (backends import it, never each other), and never the
oracle. Pure PyTorch, but for the three Triton modules, which are imported only where Triton runs.

    compact.py          the one compact form of a selection (indices padded with L, counts) and its conversions
    selection_torch.py  the selection in torch: the one production copy of Eqs. 5 and 6 (and Eq. 8)
    block_budgets.py    Eq. 7: how many blocks get each retain count, and t_j = Psi[r_j] without building Psi
    selection_triton.py the selection on the device in Triton (the triton backend's and the flash backend's),
                        its kernels in kernels_selection.py and the launch helpers in triton_launch.py
    environment.py      TRITON_INTERPRET, read in one place
    cache_protocol.py   the cache contract (KVCache) and decode_on_cache
    packed_cache.py     PackedKVCache: the compressed KV cache every fast backend builds and decodes
    decode_torch.py     a decode step's device work in torch (the default kernels of the cache)
    dense.py            exact dense attention as TCA with dense budgets (backend="auto" below the crossover)
    dense_cache.py      DenseKVCache: that path's cache, every token in one contiguous buffer, exact decode
    chunked_prefill.py  exact and streaming chunked prefill over the PackedKVCache
"""
