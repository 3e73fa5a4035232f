"""When each commit of the fold ran: the write-share tests of both fold paths (test_apply_slices, test_jetstream)."""

from __future__ import annotations

import time


def timed_commits(monkeypatch, module) -> list[tuple[float, float, int]]:
    """(start, end, events) of every `apply_logged` call that `module` makes, appended as they happen."""
    spans: list[tuple[float, float, int]] = []
    real = module.apply_logged

    def timed_apply(online, evs, last, after, **kw):
        began = time.perf_counter()
        real(online, evs, last, after, **kw)
        spans.append((began, time.perf_counter(), len(evs)))

    monkeypatch.setattr(module, "apply_logged", timed_apply)
    return spans


def gap_ratios(spans: list[tuple[float, float, int]]) -> list[float]:
    """Each pause between commits over the commit before it (the write share s makes it >= 1/s - 1)."""
    return [(b[0] - a[1]) / (a[1] - a[0]) for a, b in zip(spans, spans[1:])]
