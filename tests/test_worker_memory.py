"""Process workers keep freed memory for the next client (glibc's malloc), and
the rows' file is written without staging a copy of the rows.

In a fresh worker, glibc gives the top of its heap back to the system as
soon as a client's temporaries are freed, so every call faults them in
afresh (about 1.6 times slower for a streaming statistic than in the fit's
process). Worker tasks set malloc's thresholds once per worker process
(:func:`skfedmm.federation.local._keep_freed_memory`), never in the fit's
process.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from joblib import Parallel, delayed

from skfedmm.federation import local


def _glibc64():
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return False
    return version.startswith("glibc") and sys.maxsize > 2**32


needs_glibc = pytest.mark.skipif(not _glibc64(), reason="glibc's malloc (64-bit) only")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A streaming client's temporaries (three arrays of 4 MiB alive at once,
# then freed), in a fresh interpreter whose heap holds little else: minor
# page faults per call with glibc's defaults, then with the workers' settings.
FAULTS = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from skfedmm.federation import local

    def call(n=1 << 19):
        a = np.ones(n); b = a * 2.0; c = b + a
        return float(c[-1])

    def faults(calls=8):
        call()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            call()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls

    default = faults()
    kept = local._keep_freed_memory()
    again = local._keep_freed_memory()  # (once per process)
    print(default, faults(), kept, again, local._MALLOC_KEPT)
    """
)


_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
               "GLIBC_TUNABLES")


def _run(code, **env):
    # (without malloc settings inherited from this process: Dask's nanny,
    # started by other tests, sets MALLOC_TRIM_THRESHOLD_ in os.environ)
    inherited = {k: v for k, v in os.environ.items() if k not in _MALLOC_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**inherited, "PYTHONPATH": ROOT, **env},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(maxsplit=4)


@needs_glibc
def test_freed_memory_is_kept_for_the_next_call():
    default, kept_faults, kept, again, record = _run(FAULTS)
    # 12 MiB of temporaries are 3072 pages: faulted in afresh by default,
    # reused once the settings apply
    assert kept == again == "True" and record.strip() == "[True]"
    assert float(default) > 1000
    assert float(kept_faults) < 0.05 * float(default)


@needs_glibc
@pytest.mark.parametrize("variable, value", [
    ("MALLOC_TRIM_THRESHOLD_", "131072"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
])
def test_malloc_settings_of_the_user_are_left_alone(variable, value):
    default, later, kept, again, record = _run(FAULTS, **{variable: value})
    assert kept == again == "False" and record.strip() == "[False]"
    assert float(later) > 1000  # (the user's small threshold still applies)


def test_only_worker_tasks_change_malloc(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(local, "_keep_freed_memory", lambda: calls.append(1) or True)
    arrays = [np.ones((3, 2))] * 2
    items = [(0, (), ()), (1, (), ())]

    def run(rows):
        answers, _ = local._run_group(lambda problem, X: X.sum(), None, (), rows, items, pin=False)
        assert answers == [6.0, 6.0]

    run(arrays)  # the fit's own process, rows in memory
    assert calls == []
    mine = local._RowsFile.save(str(tmp_path / "mine.rows"), arrays, owner=os.getpid())
    run(mine.subset([0, 1]))  # (a file of this process's own fit: not a worker)
    assert calls == []
    unknown = local._RowsFile.save(str(tmp_path / "unknown.rows"), arrays, owner=None)
    run(unknown.subset([0, 1]))  # (no fit's process known)
    assert calls == []
    theirs = local._RowsFile.save(str(tmp_path / "theirs.rows"), arrays, owner=-1)
    run(theirs.subset([0, 1]))  # a worker's task (for the fit of another process)
    assert calls == [1]


def _faults_in_worker(problem, X, theta):
    """(pid, the worker's setting, minor page faults per call of a streaming statistic)."""
    import resource

    def call():
        sq = ((X - theta) ** 2).sum(axis=1)
        w = 1 / (1 + sq)
        return (w[:, None] * X).mean(0), np.log1p(sq).mean()

    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        call()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    user = any(k in os.environ and (k != "GLIBC_TUNABLES" or "glibc.malloc" in os.environ[k])
               for k in _MALLOC_ENV)
    return os.getpid(), list(local._MALLOC_KEPT), faults, user


@needs_glibc
def test_loky_worker_tasks_reuse_their_temporaries(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((100_000, 3)) for _ in range(4)]  # 2.4 MB each
    rows = local._RowsFile.save(str(tmp_path / "clients.rows"), arrays, owner=os.getpid())
    groups = [[(0, (), ()), (1, (), ())], [(2, (), ()), (3, (), ())]]
    with Parallel(n_jobs=2, backend="loky") as parallel:
        outs = parallel(
            delayed(local._run_group)(
                _faults_in_worker, None, (np.ones(3),), rows.subset([i for i, _, _ in g]), g, True)
            for g in groups
        )
    answers = [a for out, _ in outs for a in out]
    assert all(pid != os.getpid() for pid, _, _, _ in answers)
    for _, kept, faults, user in answers:
        if user:
            # a worker started with malloc settings in its environment (e.g.
            # after a Dask LocalCluster in this process, which leaves
            # MALLOC_TRIM_THRESHOLD_ in os.environ): those are left alone
            assert kept == [False]
        else:
            assert kept == [True]
            assert faults < 100  # (about 1300 per call with glibc's defaults)
    assert local._MALLOC_KEPT == []  # never in the fit's process


def test_the_rows_file_is_written_without_a_copy_of_the_rows(tmp_path):
    """Large clients go to the file directly; small ones through one small
    buffer, reused (fresh memory as large as the rows costs more than the
    write: the system hands it over one page fault at a time)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((100_000, 3)) for _ in range(4)]  # 2.4 MB each
    arrays += [rng.standard_normal((50, 3)) for _ in range(3000)]  # 3.6 MB in all
    tracemalloc.start()
    try:
        handle = local._RowsFile.save(str(tmp_path / "clients.rows"), arrays)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20  # (the buffer: 1 MiB)
    rows = handle.open()
    assert all(np.array_equal(rows[i], X) for i, X in enumerate(arrays))
