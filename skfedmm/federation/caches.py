"""Client caches kept where the clients' rows are, not in the server's messages.

A problem's client cache (:meth:`MMProblem.client_cache`: k-means' per-row
labels and bounds, the dictionary's warm-start codes) belongs to its client
and is as large as its rows. The local transport keeps every client's state
in the fit's process; without this module a client running on a worker
process or a Dask worker would receive its cache with every task and send
the new one back with its answer. Here:

- **Loky and multiprocessing** (one machine): a worker writes the client's
  new cache as a new *version* (a folder of ``.npy`` files, written under a
  temporary name and renamed, so that it appears whole or not at all) in the
  fit's private folder next to the rows' file; the task's answer carries
  only its path (:class:`CacheFile`). The next task of that client, on any
  worker, maps it back (copy-on-write: the file is never changed).
- **Dask**: the client's task returns its new cache as a separate result
  that stays on the worker (a future); the next task of the client takes
  that future as an argument, so Dask hands the cache to the task where it
  is (normally the worker holding the client's rows) without passing it
  through the fit's process.
- **In this process**: caches stay in memory, as before.

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
import shutil
import threading
import uuid
import weakref
from collections.abc import Mapping

import numpy as np

from .client import Unverified

__all__ = ["CacheFile", "CacheFolder", "StoredCache"]


class CacheFile:
    """One stored version of a client's cache: a folder of ``.npy`` files.

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
        with open(os.path.join(self.path, "meta.pkl"), "rb") as f:
            meta, names = pickle.load(f)
        out = dict(meta)
        for key, name in names.items():
            path = os.path.join(self.path, name)
            try:
                out[key] = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
            except ValueError:  # (an empty array cannot be mapped)
                out[key] = np.load(path, allow_pickle=False)
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
        name = f"cache{int(client)}-{uuid.uuid4().hex}"
        final = os.path.join(self.folder, name)
        tmp = os.path.join(self.folder, "." + name)
        os.mkdir(tmp)
        try:
            meta, names = {}, {}
            for j, (key, value) in enumerate(cache.items()):
                if isinstance(value, np.ndarray) and value.dtype != object:
                    names[key] = f"{j}.npy"
                    np.save(os.path.join(tmp, names[key]), value, allow_pickle=False)
                else:
                    meta[key] = value
            with open(os.path.join(tmp, "meta.pkl"), "wb") as f:
                pickle.dump((meta, names), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.rename(tmp, final)  # whole or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CacheFile(final)


def _plain(data):
    return dict(data)


class StoredCache(Mapping):
    """A client's cache as the server's state holds it: a reference to it.

    A read-only mapping (``cache["codes"]`` works) whose data is loaded
    only when asked, and kept once loaded; it pickles as the plain dict.
    The stored version is deleted when the last reference to it is gone.

    Parameters
    ----------
    ref : CacheFile or distributed.Future
    """

    def __init__(self, ref):
        self.ref = ref
        self._data = None
        self._lock = threading.Lock()
        if isinstance(ref, CacheFile):
            weakref.finalize(self, shutil.rmtree, ref.path, True)

    def data(self):
        """The cache as a dict (read from where it is stored, once)."""
        with self._lock:
            if self._data is None:
                ref = self.ref
                if isinstance(ref, CacheFile):
                    self._data = ref.load(mmap=False)
                else:
                    self._data = ref.result()
            return self._data

    def localize(self):
        """Keep the data here (before the stored version goes away)."""
        self.data()
        self.ref = None

    def __getitem__(self, key):
        return self.data()[key]

    def __iter__(self):
        return iter(self.data())

    def __len__(self):
        return len(self.data())

    __hash__ = object.__hash__

    def __reduce__(self):
        return _plain, (self.data(),)

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
        inner = inner.data()
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
        if inner is None or self.folder is None:
            return cache, None
        if isinstance(inner, StoredCache) and isinstance(inner.ref, CacheFile):
            return rewrap(inner.ref, unverified), inner
        data = inner.data() if isinstance(inner, StoredCache) else inner
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
        futures = [h for h in live if h.ref is not None and not isinstance(h.ref, CacheFile)]
        if futures:
            with contextlib.suppress(Exception):
                from distributed import Future, wait

                wait([h.ref for h in futures if isinstance(h.ref, Future)])
        for h in live:
            with contextlib.suppress(Exception):  # (a lost cache: the client starts afresh)
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
