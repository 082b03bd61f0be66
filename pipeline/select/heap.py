"""The compiled max-heap step the MIG and CABS greedy loops share.

Both keep candidates in a binary max-heap of (upper bound, row) pairs held in two parallel
arrays; ties on the bound go to the lower row, which is the explicit tie-break that makes the
picks identical to the reference implementations.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def sift_down(keys: np.ndarray, rows: np.ndarray, size: int, pos: int) -> None:
    """Restore the heap below ``pos``: larger key first, then the lower row.

    Keys sit next to their rows in the heap arrays, so a level compares adjacent memory.
    """
    key, row = keys[pos], rows[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        ck, cr = keys[child], rows[child]
        if child + 1 < size:
            k2, r2 = keys[child + 1], rows[child + 1]
            if k2 > ck or (k2 == ck and r2 < cr):
                child += 1
                ck, cr = k2, r2
        if not (ck > key or (ck == key and cr < row)):
            break
        keys[pos], rows[pos] = ck, cr
        pos = child
    keys[pos], rows[pos] = key, row
