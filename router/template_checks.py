"""The registration-time template check as the HTTP API answers it: a 400 naming the file."""

from __future__ import annotations

from pathlib import Path

from router.errors import APIError
from zoo.chat_template import ChatTemplateError, templates_in_folder, validate_template


def check_folder_templates(folder: Path) -> None:
    """Every chat template in `folder` validates (a 400 naming the file otherwise)."""
    for name, source in templates_in_folder(folder):
        if source is None:
            raise APIError(400, f"{name} is not UTF-8 text", param="files", code="invalid_chat_template")
        try:
            validate_template(source)
        except ChatTemplateError as exc:
            raise APIError(
                400, f"{name}: {exc.message}", param="files", code="invalid_chat_template"
            ) from None
