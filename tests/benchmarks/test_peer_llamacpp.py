"""The llama.cpp side-by-side benchmark's non-network parts: prompts, figures, ratios, command lines, cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from benchmarks.llamacpp_build import (
    BINARY_NAME,
    cached_binary,
    cmake_build_command,
    cmake_configure_command,
    ensure_llama_server,
    peer_dir,
)
from benchmarks.peer_llamacpp import default_threads
from benchmarks.peer_llamacpp_figures import (
    RunFigures,
    burst,
    headline,
    median_figures,
    prompt_windows,
    ratios,
    run_figures,
)
from benchmarks.peer_llamacpp_systems import PeerConfig, blockzoo_env, llama_server_command
from benchmarks.serving_metrics import RequestRecord, RunResult
from benchmarks.serving_workload import Target


def test_prompt_windows_are_distinct_and_exact_length_even_after_the_text_wraps() -> None:
    ids = list(range(1000))
    prompts = prompt_windows(ids, 64, 200, start=3)  # 15 windows per pass: wraps 13 times
    assert all(len(p) == 64 for p in prompts)
    assert all(p == list(range(p[0], p[0] + 64)) for p in prompts)  # consecutive text
    assert len({tuple(p) for p in prompts}) == 200
    # Consecutive windows of one pass do not overlap; a later call continues where the first stopped.
    assert prompts[1][0] == prompts[0][0] + 64
    assert prompt_windows(ids, 64, 5, start=203) == prompt_windows(ids, 64, 205, start=3)[200:]


def test_prompt_windows_refuse_too_little_text() -> None:
    with pytest.raises(ValueError, match="at least 128 ids"):
        prompt_windows(list(range(100)), 64, 1, start=0)


def test_burst_sends_everything_at_once_with_the_same_length() -> None:
    schedule = burst(Target("m", "k"), [[1, 2], [3, 4], [5, 6]], max_tokens=7)
    assert [r.arrival_s for r in schedule.requests] == [0.0, 0.0, 0.0]
    assert [r.output_len for r in schedule.requests] == [7, 7, 7]
    assert [r.prompt_ids for r in schedule.requests] == [[1, 2], [3, 4], [5, 6]]


def record(index: int, sent: float, first: float, step: float, tokens: int) -> RequestRecord:
    times = [first + i * step for i in range(tokens)]
    return RequestRecord(index, 0, 8, sent_s=sent, token_times=times, end_s=times[-1], output_tokens=tokens)


def test_single_stream_figures_are_decode_rate_and_time_to_first_token() -> None:
    # Prompt 0.5 s, then 10 tokens 20 ms apart: 50 tok/s of decode whatever the prompt cost.
    run = RunResult([record(0, 0.0, 0.5, 0.02, 10)], duration_s=0.5 + 9 * 0.02)
    fig = run_figures(run, max_tokens=10)
    assert fig.decode_tok_s == pytest.approx(50.0)
    assert fig.ttft_p50_s == pytest.approx(0.5)
    assert fig.aggregate_tok_s == pytest.approx(10 / 0.68)
    assert fig.failed == 0


def test_streams_of_the_wrong_length_or_with_errors_count_as_failed_not_as_tokens() -> None:
    good = [record(i, 0.0, 0.1 * (i + 1), 0.01, 4) for i in range(3)]
    short = record(3, 0.0, 0.1, 0.01, 2)  # stopped early: it did less work
    broken = record(4, 0.0, 0.1, 0.01, 4)
    broken.error = "HTTPStatusError: HTTP 500"
    fig = run_figures(RunResult([*good, short, broken], duration_s=2.0), max_tokens=4)
    assert fig.failed == 2
    assert fig.aggregate_tok_s == pytest.approx(12 / 2.0)
    assert fig.ttft_p50_s == pytest.approx(0.2)
    assert fig.ttft_p99_s == pytest.approx(0.2 + 0.1 * 0.98)  # numpy-style interpolation of 0.1, 0.2, 0.3
    with pytest.raises(RuntimeError, match="no request returned 4 tokens"):
        run_figures(RunResult([short], duration_s=1.0), max_tokens=4)


def fig(tok_s: float, ttft: float = 0.1, failed: int = 0) -> RunFigures:
    return RunFigures(tok_s, tok_s, ttft, 2 * ttft, failed)


def test_medians_over_repeats_and_ratios_per_scenario() -> None:
    m = median_figures([fig(10.0, 0.3), fig(30.0, 0.1, failed=1), fig(20.0, 0.2)])
    assert (m.aggregate_tok_s, m.ttft_p50_s, m.ttft_p99_s, m.failed) == (20.0, 0.2, 0.4, 1)
    ours = {1: RunFigures(40.0, 5.0, 0.1, 0.1, 0), 16: fig(150.0), 64: fig(100.0)}
    peer = {1: RunFigures(50.0, 999.0, 0.1, 0.1, 0), 16: fig(100.0), 64: fig(200.0)}
    r = ratios(ours, peer)
    # One stream is judged on decode rate, more streams on aggregate throughput.
    assert r == {1: pytest.approx(0.8), 16: pytest.approx(1.5), 64: pytest.approx(0.5)}
    assert headline(r) == "headline: single_vs_llamacpp=0.80 c16_vs_llamacpp=1.50 c64_vs_llamacpp=0.50"


def test_llama_server_gets_a_slot_per_stream_room_for_each_and_the_same_threads(tmp_path: Path) -> None:
    peer = PeerConfig(threads=3, slots=64, ctx_per_slot=320)
    cmd = llama_server_command(tmp_path / "llama-server", tmp_path / "m.gguf", 8123, peer)

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert cmd[0] == str(tmp_path / "llama-server")
    assert value("--model") == str(tmp_path / "m.gguf")
    assert (value("--threads"), value("--threads-batch"), value("--parallel")) == ("3", "3", "64")
    assert int(value("--ctx-size")) // int(value("--parallel")) == 320
    assert "--cont-batching" in cmd and value("--n-gpu-layers") == "0"
    assert blockzoo_env(3, 64) == {"BLOCKZOO_NUM_THREADS": "3", "BLOCKZOO_MAX_NUM_SEQS": "64"}


def test_threads_follow_blockzoo_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKZOO_NUM_THREADS", "5")
    assert default_threads() == 5
    monkeypatch.delenv("BLOCKZOO_NUM_THREADS")
    assert default_threads() == os.cpu_count()


def test_cmake_builds_only_llama_server_natively_and_offline(tmp_path: Path) -> None:
    configure = cmake_configure_command(tmp_path / "src", tmp_path / "build")
    for flag in (
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
    ):
        assert flag in configure
    assert configure[configure.index("-S") + 1] == str(tmp_path / "src")
    assert cmake_build_command(tmp_path / "build", 2)[-4:] == ["--target", BINARY_NAME, "-j", "2"]


def test_a_cached_binary_is_used_without_downloading_or_building(tmp_path: Path) -> None:
    assert cached_binary("9.9.9", tmp_path) is None
    folder = peer_dir("9.9.9", tmp_path)
    assert folder == tmp_path / "llama.cpp" / "9.9.9"
    folder.mkdir(parents=True)
    binary = folder / BINARY_NAME
    binary.write_text("#!/bin/sh\n")
    assert cached_binary("9.9.9", tmp_path) is None  # not executable: not a finished build
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    # Version 9.9.9 does not exist on PyPI: reaching the download would fail.
    assert ensure_llama_server("9.9.9", tmp_path) == binary
