"""The llama.cpp peer: its own `llama-server`, built from the sources vendored in `llama-cpp-python`'s sdist.

PyPI is reachable here and GitHub is not, and the sdist of `llama-cpp-python` carries a full llama.cpp
tree under `vendor/llama.cpp`. So the peer is built from that tree, for this CPU (`GGML_NATIVE`), with
only the `llama-server` target and nothing that would reach the network at build time (no OpenSSL, no
prebuilt web UI download). The binary is cached outside the clone, one folder per sdist version, so a
second run costs nothing. Run it as `python -m benchmarks.llamacpp_build` (or
`scripts/build_llama_server.sh`).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blockzoo.smollm2 import default_cache_dir

# Pinned so the peer is the same program on every machine that runs the benchmark.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BINARY_NAME = "llama-server"


class PeerBuildFailed(RuntimeError):
    """The sdist could not be downloaded or llama-server did not build."""


def peer_dir(version: str = LLAMA_CPP_PYTHON_VERSION, cache_dir: Path | None = None) -> Path:
    """`<cache>/llama.cpp/<llama-cpp-python version>/`: where the binary (and, while building, the tree) lives."""
    return (cache_dir or default_cache_dir()) / "llama.cpp" / version


def cached_binary(version: str = LLAMA_CPP_PYTHON_VERSION, cache_dir: Path | None = None) -> Path | None:
    """The cached llama-server, or None when it has not been built yet."""
    binary = peer_dir(version, cache_dir) / BINARY_NAME
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def cmake_configure_command(source: Path, build: Path) -> list[str]:
    """Configure for llama-server only: native CPU code, static, and no network at build time."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    return [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build),
        *generator,
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        # One self-contained executable that can be moved into the cache on its own.
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_BACKEND_DL=OFF",
        # LLAMA_CURL is the older name of the download support; newer trees use LLAMA_OPENSSL.
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        # The web UI would be fetched from a Hugging Face bucket or built with npm; the API needs neither.
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
    ]


def cmake_build_command(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--target", BINARY_NAME, "-j", str(jobs)]


def sdist_download_command(version: str, dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--quiet",
        f"llama-cpp-python=={version}",
        "-d",
        str(dest),
    ]


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One build per version at a time: a second caller waits and then finds the binary cached."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str) -> None:
    print(f"[llama.cpp] {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise PeerBuildFailed(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}")


def _vendored_tree(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    trees = sorted(into.glob("*/vendor/llama.cpp"))
    if not trees or not (trees[0] / "CMakeLists.txt").is_file():
        raise PeerBuildFailed(f"{sdist.name} holds no vendor/llama.cpp source tree")
    return trees[0]


def ensure_llama_server(
    version: str = LLAMA_CPP_PYTHON_VERSION, cache_dir: Path | None = None, jobs: int = 2
) -> Path:
    """The cached llama-server binary, downloading the sdist and building it on first use.

    The tree and build folder live under a temporary folder next to the cache entry and are removed
    afterwards; the binary is copied under a temporary name and renamed, so an interrupted build never
    leaves a broken binary behind.
    """
    folder = peer_dir(version, cache_dir)
    found = cached_binary(version, cache_dir)
    if found is not None:
        return found
    with _build_lock(folder):
        found = cached_binary(version, cache_dir)
        if found is not None:
            return found
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=folder, prefix="build-") as tmp:
            work = Path(tmp)
            _run(sdist_download_command(version, work), "pip download")
            sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
            if not sdists:
                raise PeerBuildFailed(f"pip download left no llama_cpp_python sdist in {work}")
            source = _vendored_tree(sdists[0], work / "src")
            build = work / "build"
            _run(cmake_configure_command(source, build), "cmake configure")
            _run(cmake_build_command(build, jobs), "cmake build")
            built = build / "bin" / BINARY_NAME
            if not built.is_file():
                raise PeerBuildFailed(f"the build finished without {built}")
            staged = folder / f".{BINARY_NAME}.partial"
            shutil.copy2(built, staged)
            os.replace(staged, folder / BINARY_NAME)
        seconds = time.monotonic() - started
        (folder / "build_seconds.txt").write_text(f"{seconds:.0f}\n")
        print(f"[llama.cpp] llama-server built in {seconds:.0f} s: {folder / BINARY_NAME}", file=sys.stderr)
    return folder / BINARY_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build and cache llama.cpp's llama-server (the benchmark peer)."
    )
    parser.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    args = parser.parse_args(argv)
    try:
        print(ensure_llama_server(args.version, jobs=args.jobs))
    except PeerBuildFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
