"""Errors the engine raises for bad models and bad requests; each message names the culprit."""

from __future__ import annotations


class BlockZooError(Exception):
    """Base class for errors that are the caller's fault and deserve a clear 4xx-style message."""


class ModelLoadError(BlockZooError):
    """A model folder or block file cannot be loaded."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's architecture is not one the engine implements."""


class MissingFileError(ModelLoadError):
    """A file the checkpoint needs is absent."""


class CorruptCheckpointError(ModelLoadError):
    """A safetensors file is truncated, malformed, or holds the wrong tensors."""


class RequestError(BlockZooError):
    """A request cannot be served as given (too long, bad parameters)."""


class PromptTooLongError(RequestError):
    """The prompt (plus the requested output) does not fit the model or the cache."""
