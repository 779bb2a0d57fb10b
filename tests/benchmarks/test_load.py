"""benchmarks/load.py end to end, small: the real server in a child process, clients hanging up."""

from __future__ import annotations

import re
import subprocess
import sys

from benchmarks.load import rss_growth


def test_rss_growth_compares_the_halves() -> None:
    assert rss_growth([]) == 0.0
    assert abs(rss_growth([(0.0, 100), (1.0, 100), (2.0, 110), (3.0, 110)]) - 0.1) < 1e-12
    assert abs(rss_growth([(0.0, 100), (1.0, 102), (2.0, 101)]) - (101.5 / 100 - 1)) < 1e-12


def test_short_run_prints_a_clean_headline_last() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--clients", "16", "--duration", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"headline: errors=(\d+) leaked_pages=(\d+) leaked_leases=(\d+) rss_growth=(-?[\d.]+)", last
    )
    assert match is not None, done.stdout[-2000:]
    assert match.group(1, 2, 3) == ("0", "0", "0"), done.stdout[-2000:]
    assert "hung up by the client" in done.stdout
