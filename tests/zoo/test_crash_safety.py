"""SIGKILL a registration at random points: the catalog stays consistent and gc clears orphans."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from blockzoo.tiny_models import TinyModelCache
from tests.zoo.test_registry import check_ref_counts
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo, store_files
from zoo.block_store import BlockStore
from zoo.catalog.models import Model
from zoo.registry import Zoo

TRIALS = 10


def run_child(root: Path, folder: Path, name: str, kill_after: float | None) -> tuple[bool, float]:
    """Start a registration; kill it `kill_after` seconds after it starts. Returns (finished, seconds)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.zoo.crash_register", str(root), str(folder), name],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "start"
    started = time.monotonic()
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    rest = proc.stdout.read()
    return proc.returncode == 0 and "done" in rest, time.monotonic() - started


def assert_consistent(zoo: Zoo) -> set[str]:
    """Every ready model loads from files that exist and hash right; counts match the chains."""
    check_ref_counts(zoo)
    names = set()
    with zoo.sessions() as session:
        models = list(session.scalars(select(Model)))
    for model in models:
        ref = zoo.resolve("acme" if model.tenant_id is not None else None, model.name)
        chain = zoo.load_chain(ref, torch.float32, verify=True)
        assert len(chain.layers) == len(ref.entries) - 2
        names.add(model.name)
    return names


@pytest.mark.timeout(600)
def test_sigkill_during_registration_leaves_catalog_consistent(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    # Big enough that writing its blocks takes a while, so kills land inside the registration.
    base = tiny_model_factory(
        "llama", hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=768
    )
    root = tmp_path / "zoo"
    zoo = open_zoo(root)
    zoo.add_base("base", base)
    add_tenant(zoo, "acme")
    rng = random.Random(1234)
    finished, duration = run_child(
        root, fine_tune_top_layers(base, tmp_path / "ft-calib", list(range(8)), 99), "calibration", None
    )
    assert finished
    expected = {"base", "calibration"}
    killed = 0
    for trial in range(TRIALS):
        folder = fine_tune_top_layers(base, tmp_path / f"ft{trial}", list(range(8)), seed=trial)
        done, _ = run_child(root, folder, f"ft{trial}", kill_after=rng.uniform(0.0, duration * 1.1))
        killed += not done
        zoo = open_zoo(root)
        names = assert_consistent(zoo)
        if done:
            expected.add(f"ft{trial}")
        # A killed registration either committed (all of it) or left no row at all.
        assert names - {f"ft{trial}"} == expected - {f"ft{trial}"}
        expected |= names
    # Kill times are drawn over the calibration run's duration; on a shared machine later runs can be
    # much faster than it, so only ask that a fair share of the kills landed inside a registration.
    assert killed >= 3, f"only {killed} of {TRIALS} registrations were interrupted"
    # gc (with no grace for temp files, since no writer is running) removes every orphan.
    zoo = Zoo(zoo.sessions, BlockStore(root / "store", temp_grace_s=0))
    zoo.gc()
    files = store_files(zoo)
    assert not any(".tmp" in f or f.split("/")[-1].startswith(".") for f in files), files
    referenced = set()
    for name in expected:
        ref = zoo.resolve("acme" if name != "base" else None, name)
        referenced |= {e.block_id for e in ref.entries}
    on_disk = {Path(f).name.removesuffix(".safetensors") for f in files if f.startswith("blocks/")}
    assert on_disk == referenced
    assert_consistent(zoo)
