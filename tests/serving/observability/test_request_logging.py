"""JSON log lines and the per-request context, in plain code and inside a real grpc.aio handler."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from contextlib import contextmanager

import grpc
import pytest

from semrank.ranking.v1 import ranking_service_pb2_grpc as pb_grpc
from serving.observability.request_logging import (
    MAX_LOGGED_CHARS,
    JsonFormatter,
    bind_request,
    clip,
    configure_logging,
    request_context,
    update_request,
)
from tests.serving.api.grpc_testkit import rank_request, serve

ISO_UTC_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@contextmanager
def json_lines(logger_name: str):
    """Capture `logger_name`'s records as parsed JSON lines (the list fills as records arrive)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines: list[dict] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        raw = stream.getvalue().splitlines()
        lines.extend(json.loads(line) for line in raw)


def test_line_has_base_fields_and_only_the_bound_request_fields():
    log = logging.getLogger("semrank.test.logs")
    with json_lines(log.name) as lines:
        log.info("no request %s", "here")
        with bind_request(request_id="r1", user_id="u1"):
            log.warning("bound")
            update_request(model_version="v7")
            log.info("updated")
        log.info("after")
    none, bound, updated, after = lines
    assert set(none) == {"ts", "level", "logger", "message"}
    assert ISO_UTC_MS.match(none["ts"]), none["ts"]
    assert none["message"] == "no request here" and none["logger"] == "semrank.test.logs"
    assert bound["level"] == "WARNING" and bound["request_id"] == "r1" and bound["user_id"] == "u1"
    assert "variant" not in bound and "model_version" not in bound
    assert updated["model_version"] == "v7"
    assert "request_id" not in after  # the bind (and updates inside it) end with the block


def test_a_long_value_from_a_caller_is_logged_cut_short_with_its_length():
    """Issue 14, problem 11: a rejected 10,000-character user_id was logged in full."""
    log = logging.getLogger("semrank.test.logs")
    with json_lines(log.name) as lines:
        with bind_request(request_id="r" * 300, user_id="u" * 10_000):
            log.info("bound")
    (line,) = lines
    assert line["user_id"] == "u" * MAX_LOGGED_CHARS + "...(10000 chars)"
    assert line["request_id"] == "r" * MAX_LOGGED_CHARS + "...(300 chars)"
    assert clip("short") == "short" and clip(None) is None


def test_nested_binds_merge_and_unknown_fields_fail():
    with bind_request(request_id="r1"):
        with bind_request(variant="control"):
            assert request_context.get().fields() == {"request_id": "r1", "variant": "control"}
        assert request_context.get().fields() == {"request_id": "r1"}
    with pytest.raises(TypeError):
        with bind_request(requestid="typo"):
            pass


def test_one_physical_line_per_record_with_exception_and_extras():
    log = logging.getLogger("semrank.test.logs")
    with json_lines(log.name) as lines:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.exception("multi\nline \u2028 message", extra={"candidates": 300, "obj": object()})
    (line,) = lines  # splitlines() also splits on U+2028: still exactly one line
    assert line["message"] == "multi\nline \u2028 message"
    assert line["candidates"] == 300 and line["obj"].startswith("<object")
    assert "ValueError: bad" in line["exc"]


def test_concurrent_tasks_keep_their_own_request_ids():
    log = logging.getLogger("semrank.test.logs")

    async def one(rid: str):
        with bind_request(request_id=rid):
            for _ in range(3):
                await asyncio.sleep(0)
                log.info(rid)

    async def run():
        await asyncio.gather(*(one(f"r{k}") for k in range(4)))

    with json_lines(log.name) as lines:
        asyncio.run(run())
    assert len(lines) == 12
    assert all(line["request_id"] == line["message"] for line in lines)


def test_json_line_from_a_real_grpc_handler_carries_the_request_fields():
    async def run():
        async with serve() as (port, _):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await pb_grpc.RankingServiceStub(ch).Rank(rank_request(request_id="req-42", n=5))

    with json_lines("tests.serving.api.grpc_testkit") as lines:
        asyncio.run(run())
    (line,) = lines
    assert line["message"] == "ranked 5 candidates"
    assert line["request_id"] == "req-42"
    assert line["user_id"] == "u1" and line["variant"] == "treatment" and line["model_version"] == "v-test"


def test_configure_logging_replaces_only_its_own_handler():
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        configure_logging("debug", json=True)
        h = configure_logging("INFO", json=True)
        ours = [x for x in root.handlers if x not in before]
        assert ours == [h] and isinstance(h.formatter, JsonFormatter)
        assert root.level == logging.INFO
        assert all(x in root.handlers for x in before)  # e.g. pytest's capture handler stays
    finally:
        for x in [x for x in root.handlers if x not in before]:
            root.removeHandler(x)
        root.setLevel(level)
