"""The command line: ``python -m skfedmm demo`` and usage errors."""

import math
import re

import pytest

from skfedmm.__main__ import main

METHODS = (
    "FedMM (surrogate aggregation)",
    "parameter aggregation",
    "same MM iteration, pooled rows",
    "centralized (sklearn, pooled rows)",
)


def _table_rows(out):
    """The table's data rows, keyed by method."""
    rows = {}
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    for line in lines[start:end]:
        for method in METHODS:
            if line.startswith(method):
                rows[method] = line[len(method):].split()
    return rows


def test_demo_quick_prints_the_three_methods(capsys):
    status = main(["demo", "--quick", "--seed", "1"])
    assert status == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    for column in ("objective", "atoms recovered", "bits sent", "time"):
        assert column in header
    rows = _table_rows(out)
    assert set(rows) == set(METHODS), out
    for method, cells in rows.items():
        # objective, "found/total", "(pct%)", bits ("X Mbit" or "-"), rounds, time
        objective = float(cells[0])
        assert math.isfinite(objective) and objective > 0, (method, cells)
        found, total = map(int, cells[1].split("/"))
        assert total == 30 and 0 <= found <= total
        time_s = float(cells[-1])
        assert math.isfinite(time_s) and time_s >= 0
        assert int(cells[-2]) >= 1
        if method.startswith(("centralized", "same")):
            assert cells[3] == "-"
        else:
            bits = float(cells[3])
            assert math.isfinite(bits) and bits > 0 and cells[4] == "Mbit"
    # the explanation paragraph follows the table
    assert re.search(r"surrogate\s+aggregation\s+ends\s+at", out)
    # FedMM is the same MM iteration as one machine holding the pooled rows
    assert math.isclose(float(rows[METHODS[0]][0]), float(rows[METHODS[2]][0]), rel_tol=1e-3)


def test_no_command_prints_usage(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: skfedmm" in out and "demo" in out


@pytest.mark.parametrize(
    "argv, usage",
    [
        (["bogus"], "usage: skfedmm [-h]"),
        (["--bogus"], "usage: skfedmm [-h]"),
        (["demo", "--no-such-flag"], "usage: skfedmm demo"),
        (["demo", "--rounds", "0"], "usage: skfedmm demo"),
        (["demo", "--rounds", "x"], "usage: skfedmm demo"),
        (["demo", "--n-jobs", "0"], "usage: skfedmm demo"),
    ],
)
def test_bad_options_exit_with_status_2(argv, usage, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_version(capsys):
    import skfedmm

    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"skfedmm {skfedmm.__version__}"


def test_closed_pipe_is_quiet():
    """``python -m skfedmm demo | head -1`` ends without a traceback."""
    import subprocess
    import sys

    proc = subprocess.run(
        f"{sys.executable} -m skfedmm demo --quick | head -1", shell=True,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.stdout.startswith("skfedmm demo:")
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
