"""Structured log lines carry the fields passed with `extra=`."""

from __future__ import annotations

import json
import logging

import pytest

from blockzoo.logging_setup import configure_logging


def test_json_lines_carry_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_lines=True)
    logging.getLogger("bz.test").info("registered", extra={"model": "m1", "blocks_new": 3})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["msg"] == "registered" and record["model"] == "m1" and record["blocks_new"] == 3
    assert record["level"] == "info"


def test_key_value_lines_and_level_filter(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING", json_lines=False)
    log = logging.getLogger("bz.test")
    log.info("hidden")
    log.warning("shown", extra={"tenant": "acme"})
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "shown tenant=acme" in err
