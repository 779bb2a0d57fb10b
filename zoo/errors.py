"""Registration errors: each is the caller's fault and says what to fix (a 4xx, never a 500)."""

from __future__ import annotations

from runtime.errors import BlockZooError


class RegistrationError(BlockZooError):
    """A model cannot be registered as given."""


class InvalidNameError(RegistrationError):
    """A model name is empty, too long, or could escape a path."""


class DuplicateNameError(RegistrationError):
    """The owner already has a model of that name."""


class UnknownBaseError(RegistrationError):
    """No registered base model fits the checkpoint or adapter."""


class ShapeMismatchError(RegistrationError):
    """The checkpoint's shapes do not match the chosen base."""


class NotFoundError(RegistrationError):
    """No such model (or no such model visible to the caller)."""


class EquivalenceRefusedError(RegistrationError):
    """Substitution or compression would change the model's outputs beyond the bound."""
