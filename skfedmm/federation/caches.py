"""Client caches kept where the clients' rows are, not in the server's messages.

A problem's client cache (:meth:`MMProblem.client_cache`: k-means' per-row
labels and bounds, the dictionary's warm-start codes) belongs to its client
and is as large as its rows. The local transport keeps every client's state
in the fit's process; without this module a client running on a worker
process or a Dask worker would receive its cache with every task and send
the new one back with its answer. Here:

- **Loky and multiprocessing** (one machine): a worker writes the client's
  new cache as a new *version* (one file, written under a temporary name
  and renamed, so that it appears whole or not at all) in the
  fit's private folder next to the rows' file; the task's answer carries
  only its path (:class:`CacheFile`). The next task of that client, on any
  worker, maps it back (copy-on-write: the file is never changed).
- **Dask**: the client's task returns its answer and its new cache; only
  the answer is gathered, and the task's result stays on the worker (a
  future); the next task of the client takes that future as an argument, so Dask hands the cache to the task where it
  is (normally the worker holding the client's rows) without passing it
  through the fit's process.
- **In this process** (threads, or clients the transport runs here):
  caches stay in memory.

In the server's state a stored cache is a :class:`StoredCache`: a read-only
mapping that loads its data only when asked (when a client runs in this
process, or when the state is pickled), and that unpickles as a plain dict.
Versions are never overwritten: a round whose answers are discarded (an
atomic round that failed) leaves the committed versions intact, and the
discarded ones are deleted when nothing refers to them any more. When the
fit ends, the caches of the states still alive are read into memory before
the fit's folder is removed (or the Dask futures released), so a returned
state continues (``warm_start``, ``resume``) like one from an in-process fit.
"""

import contextlib
import os
import pickle
import struct
import threading
import uuid
import weakref
from collections.abc import Mapping

import numpy as np

from .client import Unverified

__all__ = ["CacheFile", "CacheFolder", "DaskCache", "StoredCache"]


_ALIGN = 64  # (arrays start on 64-byte boundaries, as freshly allocated ones do)


def _aligned_offset(n):
    return -(-n // _ALIGN) * _ALIGN


class CacheFile:
    """One stored version of a client's cache: one file.

    The file holds a header (the non-array values and each array's offset,
    shape, dtype and memory order) and then the arrays, each starting on a
    64-byte boundary.

    Parameters
    ----------
    path : str
    """

    __slots__ = ("path",)

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return CacheFile, (self.path,)

    def load(self, mmap=True):
        """The cache as a dict; arrays mapped copy-on-write (``mmap``) or read."""
        import mmap as _mmap

        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            meta, layout = pickle.loads(f.read(size))
            start = _aligned_offset(8 + size)
            out = dict(meta)
            total = sum(int(np.prod(shape)) for _, shape, _, _ in layout.values())
            if total == 0:
                buffer = None
            elif mmap:
                buffer = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
            else:
                f.seek(0)
                buffer = bytearray(f.read())
        for key, (offset, shape, dtype, order) in layout.items():
            if int(np.prod(shape)) == 0:
                out[key] = np.empty(shape, dtype=dtype, order=order)
            else:
                out[key] = np.ndarray(shape, dtype=dtype, buffer=buffer, offset=start + offset,
                                      order=order)
        return out


class CacheFolder:
    """Where a fit's workers write their clients' caches (pickled as its path).

    Parameters
    ----------
    folder : str
        The fit's private folder (removed at the end of the fit).
    """

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return CacheFolder, (self.folder,)

    def save(self, client, cache):
        """Write ``cache`` (a dict) as a new version; its :class:`CacheFile`."""
        name = f"client{int(client)}-{uuid.uuid4().hex}.cache"
        final = os.path.join(self.folder, name)
        tmp = os.path.join(self.folder, "." + name)
        meta, arrays, layout, end = {}, {}, {}, 0
        for key, value in cache.items():
            if isinstance(value, np.ndarray) and value.dtype != object:
                order = "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C"
                arrays[key] = np.ravel(value, order=order)
                at = _aligned_offset(end)
                layout[key] = (at, value.shape, value.dtype.str, order)
                end = at + value.nbytes
            else:
                meta[key] = value
        header = pickle.dumps((meta, layout), protocol=pickle.HIGHEST_PROTOCOL)
        start = _aligned_offset(8 + len(header))
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(header)))
                f.write(header)
                for key, flat in arrays.items():
                    if flat.size:
                        f.seek(start + layout[key][0])
                        f.write(memoryview(np.ascontiguousarray(flat)).cast("B"))
                f.truncate(start + end)
            os.rename(tmp, final)  # whole or not at all
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return CacheFile(final)


def _unlink(path):
    with contextlib.suppress(OSError):
        os.unlink(path)


def _plain(data):
    return dict(data)


def _none():
    return None


class DaskCache:
    """A client's cache on a Dask worker: the second item of its last task's result.

    Parameters
    ----------
    future : distributed.Future
    """

    def __init__(self, future):
        self.future = future

    def result(self):
        return self.future.result()[1]


class StoredCache(Mapping):
    """A client's cache as the server's state holds it: a reference to it.

    A read-only mapping (``cache["codes"]`` works) whose data is loaded
    only when asked, and kept once loaded; it pickles as the plain dict.
    The stored version is deleted when the last reference to it is gone.

    Parameters
    ----------
    ref : CacheFile or DaskCache
    """

    def __init__(self, ref):
        self.ref = ref
        self._data = None
        self._lock = threading.Lock()
        if isinstance(ref, CacheFile):
            weakref.finalize(self, _unlink, ref.path)

    def data(self):
        """The cache as a dict (read from where it is stored, once); None if lost."""
        with self._lock:
            if self._data is None and self.ref is not None:
                ref = self.ref
                if isinstance(ref, CacheFile):
                    self._data = ref.load(mmap=False)
                else:
                    self._data = ref.result()
            return self._data

    def localize(self):
        """Keep the data here (before the stored version goes away).

        A cache that cannot be read (a Dask worker lost) is dropped: its
        client starts afresh, as with a cache that does not match its rows.
        """
        try:
            self.data()
        except Exception:  # noqa: BLE001 - lost: the client rebuilds it
            self._data = None
        self.ref = None

    def __getitem__(self, key):
        return (self.data() or {})[key]

    def __iter__(self):
        return iter(self.data() or {})

    def __len__(self):
        return len(self.data() or {})

    __hash__ = object.__hash__

    def __reduce__(self):
        data = self.data()
        return (_plain, (data,)) if data is not None else (_none, ())

    def __repr__(self):
        where = "here" if self.ref is None else type(self.ref).__name__
        return f"StoredCache({where})"


def split_cache(cache):
    """``(inner, unverified)``: a state's cache without its :class:`Unverified` wrapper."""
    if isinstance(cache, Unverified):
        return cache.cache, True
    return cache, False


def rewrap(inner, unverified):
    return Unverified(inner) if unverified and inner is not None else inner


def in_memory(cache):
    """A state's cache for a client running in this process (data, not references)."""
    inner, unverified = split_cache(cache)
    if isinstance(inner, StoredCache):
        try:
            inner = inner.data()
        except Exception:  # noqa: BLE001 - lost (a Dask worker gone): start afresh
            inner = None
    return rewrap(inner, unverified)


class CacheStore:
    """The fit's record of stored caches (in the fit's process).

    Parameters
    ----------
    folder : str or None
        The fit's private folder (process workers), None otherwise.
    """

    def __init__(self, folder=None):
        self.folder = None if folder is None else CacheFolder(folder)
        self._live = weakref.WeakValueDictionary()  # (by number: handles compare by value)
        self._count = 0
        self._lock = threading.Lock()

    def handle(self, ref):
        """A new :class:`StoredCache` for ``ref``, localized at the end of the fit."""
        stored = StoredCache(ref)
        with self._lock:
            self._count += 1
            self._live[self._count] = stored
        return stored

    def outgoing(self, i, cache):
        """What a worker's task carries for client ``i``'s cache (files: a path).

        Returns
        -------
        sent : object
            The cache as the task carries it.
        handle : StoredCache or None
            The handle of the sent version (to reuse when the client keeps it).
        """
        inner, unverified = split_cache(cache)
        if inner is None or self.folder is None:  # (threads: in memory)
            return in_memory(cache), None
        if isinstance(inner, StoredCache) and isinstance(inner.ref, CacheFile):
            return rewrap(inner.ref, unverified), inner
        data = inner.data() if isinstance(inner, StoredCache) else inner
        if data is None:  # (lost)
            return None, None
        # (a cache made in this process, or read back at the end of a fit:
        # stored once, then it stays with the workers)
        handle = self.handle(self.folder.save(i, data))
        return rewrap(handle.ref, unverified), handle

    def incoming(self, answer, sent):
        """A worker's answer, with its cache's path turned into a handle."""
        if not (isinstance(answer, tuple) and len(answer) == 2):
            return answer
        msg, state = answer
        cache = getattr(state, "cache", None)
        if not isinstance(cache, CacheFile):
            return answer
        if sent is not None and sent.ref is not None and sent.ref.path == cache.path:
            handle = sent  # the client kept its cache: the same version
        else:
            handle = self.handle(cache)
        state.cache = handle
        return msg, state

    def close(self):
        """Read every live stored cache into memory (the fit ends)."""
        with self._lock:
            live = list(self._live.values())
        futures = [h.ref.future for h in live if isinstance(h.ref, DaskCache)]
        if futures:
            with contextlib.suppress(Exception):
                from distributed import wait

                wait(futures)
        for h in live:
            h.localize()


# --------------------------------------------------------------------------
# At the worker
# --------------------------------------------------------------------------
def open_cache(cache):
    """A task's cache as the client function takes it (stored versions mapped)."""
    inner, unverified = split_cache(cache)
    if isinstance(inner, CacheFile):
        return rewrap(inner.load(mmap=True), unverified), inner
    return cache, None


def store_answer(answer, folder, client, opened, loaded):
    """A worker's answer with its new cache written as a version (its path).

    ``opened`` is the version the task read (``loaded`` its data): a client
    that kept that very cache answers with the same path, written once.
    """
    if folder is None or not (isinstance(answer, tuple) and len(answer) == 2):
        return answer
    msg, state = answer
    cache = getattr(state, "cache", None)
    if cache is None or not isinstance(cache, dict):
        return answer
    if opened is not None and (cache is loaded or (
            isinstance(loaded, Unverified) and cache is loaded.cache)):
        ref = opened
    else:
        ref = folder.save(client, cache)
    state.cache = ref
    return msg, state
