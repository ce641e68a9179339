"""What the non-oracle backends share: the compact selected-position form, the Eq. 7 budget counts, the
environment switches they read. Pure PyTorch; imports no backend (backends import it, never each other).

    compact.py        the one compact form of a selection (indices padded with L, counts) and its conversions
    block_budgets.py  Eq. 7: how many blocks get each retain count, and t_j = Psi[r_j] without building Psi
    environment.py    TRITON_INTERPRET, read in one place
"""
