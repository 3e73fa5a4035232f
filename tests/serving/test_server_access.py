"""What `serving.server.RankingServer` checks before it opens anything: an open admin API only on
loopback, and a start-up log line that says what is open."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from featurizer.errors import ConfigError
from serving.config import ServeConfig, TokenAuth
from serving.server import RankingServer, is_loopback


def cfg(**kw) -> ServeConfig:
    return ServeConfig(bundle_dir=Path("bundle"), data_dir=Path("data"), **kw)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True),
                                            ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                            ("10.0.0.5", False), ("example.com", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::"])
def test_an_open_admin_api_off_loopback_is_refused_at_start(host):
    with pytest.raises(ConfigError, match="needs a loopback host"):
        RankingServer(cfg(host=host, open_admin=True))._check_access()


def test_start_up_says_that_writes_are_open_without_tokens(caplog):
    with caplog.at_level(logging.INFO, logger="serving.server"):
        RankingServer(cfg())._check_access()
    assert "writes are open" in caplog.text and "admin RPCs are off" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serving.server"):
        RankingServer(cfg(open_admin=True))._check_access()
    assert "admin RPCs (ReloadBundle, DeleteUser) accept any caller" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serving.server"):
        RankingServer(cfg(host="0.0.0.0", tokens=TokenAuth.from_spec("t-0123456789abcdef:admin")))._check_access()
    assert "open" not in caplog.text


@pytest.mark.parametrize("kw, match", [
    ({"port": 99999}, "port=99999: a TCP port is 0 to 65535"),
    ({"port": -1}, "port=-1"),
    ({"metrics_port": 70000}, "metrics_port=70000"),
    ({"max_concurrent_rpcs": 0}, "max_concurrent_rpcs=0"),
    ({"snapshot_interval_s": -1.0}, "snapshot_interval_s=-1.0 must be >= 0"),
    ({"sequence_items": -1}, "sequence_items=-1 must be >= 0"),
    ({"gc_thresholds": (700, 0, 10)}, "gc_thresholds=.*each >= 1"),
    ({"gc_thresholds": (700, 10)}, "gc_thresholds=.*three"),
    ({"experiments_file": Path("/nonexistent/experiments.json")}, "experiments file .* not found"),
])
def test_configuration_errors_are_config_errors_naming_the_setting(kw, match):
    """Issue 30: a bad setting is a ConfigError with a message (the CLI prints it and exits 2), never
    a traceback, nor (a port past 65535) a server bound to the port grpc wraps it to."""
    with pytest.raises(ConfigError, match=match):
        cfg(**kw)


def test_a_budget_below_one_is_a_config_error():
    from serving.config import Budgets

    with pytest.raises(ConfigError, match="admission budgets must be >= 1"):
        Budgets(writes=0)
