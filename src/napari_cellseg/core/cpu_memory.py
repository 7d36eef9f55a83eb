"""Keeping freed memory for reuse while a network runs on a CPU (glibc's malloc settings).

A TinyViT pass over a 704 px window allocates and frees dozens of tensors of
30-130 MB (attention inputs, MLP hidden layers, window copies). glibc's malloc
serves every block over 32 MiB with a fresh ``mmap`` and gives it back with
``munmap`` when torch frees it, so the next pass touches new pages again: the
kernel zero-fills them one 4 KiB page fault at a time. On the 2-core test
machine that was a third of the encoder's time (the linear layers whose outputs
are new 100 MB blocks ran at 30-110 GMAC/s, those with small outputs at 300).

:func:`reuse_freed_memory` turns glibc's ``mmap`` off (``M_MMAP_MAX = 0``) and
its heap trimming off (``M_TRIM_THRESHOLD``) for the duration of a run, so
freed blocks stay in the heap and the next allocation of that size reuses
pages that are already mapped. When the last run ends it sets the thresholds
glibc's own adaptive rule reaches once a process has freed a block of 32 MiB
or more (mmap above 32 MiB, trim above 64 MiB: the state of any napari session
that has loaded a large image) and calls ``malloc_trim(0)``, which returns the
freed pages to the system. Nothing is allocated or copied; the network's
numbers are the same.

Only glibc (Linux) has these settings; elsewhere, or where the C library cannot
be opened, the context manager does nothing. Runs on GPUs do nothing either.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator

#: switch for comparisons in benchmarks: False leaves malloc's settings alone
ENABLED = True

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

#: settings restored when the last run ends: glibc's adaptive thresholds after a freed block of >= 32 MiB
#: (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, and twice that for trimming) and its default number of mappings
RESTORED_MMAP_THRESHOLD = 32 * 2**20
RESTORED_TRIM_THRESHOLD = 64 * 2**20
RESTORED_MMAP_MAX = 65536

_lock = threading.Lock()
_holders = 0
_libc: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: not glibc


def _glibc():
    """The C library when it is glibc with ``mallopt`` and ``malloc_trim``, else None."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.gnu_get_libc_version.restype = ctypes.c_char_p
                lib.gnu_get_libc_version()  # only glibc has it
                lib.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                lib.malloc_trim.argtypes = (ctypes.c_size_t,)
                _libc = lib
            except (OSError, AttributeError):  # musl, a static build, ...: leave malloc alone
                _libc = False
    return _libc or None


def available() -> bool:
    """Whether this process's malloc can be told to keep freed memory (Linux with glibc)."""
    return _glibc() is not None


def active() -> bool:
    """Whether a :func:`reuse_freed_memory` block is in force now."""
    return _holders > 0


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Leave malloc at its defaults inside this block (:data:`ENABLED` False), for same-run comparisons."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


@contextlib.contextmanager
def reuse_freed_memory(device: object = "cpu") -> Iterator[bool]:
    """Keep blocks that torch frees in the heap for reuse while the block runs (see the module docstring).

    Nested and concurrent blocks share one setting: the first one in changes it, the last one out restores it and
    returns the freed pages to the system.

    Parameters
    ----------
    device : str or torch.device
        Where the network runs; anything but a CPU leaves malloc alone.

    Yields
    ------
    bool
        Whether malloc's settings are changed for this block.

    Examples
    --------
    >>> with reuse_freed_memory("cuda") as changed:
    ...     changed
    False
    """
    global _holders
    lib = _glibc() if ENABLED and str(device).split(":")[0] == "cpu" else None
    if lib is None:
        yield False
        return
    with _lock:
        if _holders == 0:
            lib.mallopt(_M_MMAP_MAX, 0)
            lib.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        _holders += 1
    try:
        yield True
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                lib.mallopt(_M_MMAP_THRESHOLD, RESTORED_MMAP_THRESHOLD)
                lib.mallopt(_M_TRIM_THRESHOLD, RESTORED_TRIM_THRESHOLD)
                lib.mallopt(_M_MMAP_MAX, RESTORED_MMAP_MAX)
                lib.malloc_trim(0)
