"""Keep freed activation memory in the process instead of handing it back to the OS (glibc only).

Eager PyTorch allocates and frees megabyte-sized activations in every op. glibc's malloc serves a
block that size from fresh mmap'd pages, or from the heap and then trims the heap when the free
space at its top passes a threshold it keeps adjusting; either way new pages are faulted in op
after op. Measured on a 512-token prefill of SmolLM2-135M in bf16 on 2 cores: 68,000 page faults
and a quarter of the time in the kernel; with the settings below, none, and 1.4x the tokens/s.

`keep_freed_memory()` fixes the mmap threshold at glibc's maximum (32 MiB: blocks below it come
from the heap and are reused) and lets up to 256 MiB of free heap stay mapped. Peak memory is
unchanged; a process keeps up to 256 MiB of its past activations until it exits, as PyTorch's
GPU caching allocator does. It is process-wide, so it is an explicit opt-in: autolm's command line,
server and benchmark turn it on; a library call such as from_pretrained leaves the process alone.

`settle_imports()` imports torch with the collector paused (`collector_paused()`: the collections its ~260k
new objects trigger took 0.05-0.1 s of its 0.85 s) and moves every object alive then out of reach of Python's
garbage collector (gc.freeze): a full collection no longer walks them, and autolm's own imports after it take
45 ms instead of 95-120. Process-wide, so opted in to by the command line and the benchmark; a library user's
first use of `autolm.X` pauses the collector only while it imports (and restores it), for the same 40 ms.

`huge_page_tensor(nbytes)` is memory of its own for long-lived weights: a private anonymous mapping advised to
use transparent huge pages (madvise, for that mapping only). Kernels that stream weights from memory read them
faster from 2 MiB pages than from 4 KiB pages (fewer TLB misses, prefetchers not stopped at every page):
measured on a 1.1B Q4_K_M GGUF's matrices, 24.5 ms per token over 4 KiB pages against 17-20 ms over 2 MiB pages
(a file's map gets those where the page cache holds the file in 2 MiB folios: sources.ggml.file_map). Their first
touch costs what the OS charges for fresh huge pages: ~0.05 s per 660 MB here when recently used, ~1.3 s under a
VM whose host takes idle guest memory back (free page reporting).

`give_back_freed_memory()` hands the free heap back to the OS now (glibc's malloc_trim; it changes no
setting): loading calls it once the weights are in place, so the temporaries of a quantizing or repacking
load (unpacked quants, float scales) do not stay in the process's memory, whichever setting is in force.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os

HUGE_PAGE = 2 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 << 20


@functools.cache
def _libc():
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (AttributeError, ValueError, OSError):
        return None
    return ctypes.CDLL(None)


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings above; False where the C library is not glibc (nothing is changed)."""
    libc = _libc()
    return libc is not None and bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for a block of imports, as it was after. An import of torch or of
    autolm's model code creates objects by the hundred thousand, and the collections they trigger walk every
    object alive: measured here, 0.1 s of `import torch`'s 0.85 s and 60 ms of autolm's 95 ms. The cycles left
    meanwhile (~7,000 objects after torch's import) wait for the next collection."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@functools.cache
def settle_imports() -> None:
    """Import torch with the collector paused, then gc.freeze() (see above)."""
    with collector_paused():
        import torch  # noqa: F401  (its objects are the ones frozen)

    gc.freeze()


def give_back_freed_memory() -> bool:
    """Return the heap's free pages to the OS (glibc only; False elsewhere)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def huge_page_tensor(nbytes: int):
    """A uint8 tensor of `nbytes` over a private anonymous mapping (whole huge pages, which the kernel aligns to
    them) advised to use transparent huge pages where the OS offers them; plain pages elsewhere."""
    import mmap

    import torch

    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no private mappings to advise
        return torch.empty(nbytes, dtype=torch.uint8)
    m = mmap.mmap(
        -1, max(-(-nbytes // HUGE_PAGE), 1) * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # transparent huge pages compiled out: plain pages
            m.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(m, dtype=torch.uint8)[:nbytes]  # the tensor holds the mapping
