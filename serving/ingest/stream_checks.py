"""What the JetStream fold does with each stream message before it applies it (issue 30: the stream
is an input too): the checks every replica makes alike, and the copies of what they skip.

    checks = MessageChecks(rules, item_rules, stats.refused)
    event = checks.event(m)                # a LoggedEvent, or BadStreamMessage / ErasedUser
    item = checks.item(m, m.headers or {})  # a SharedItem, or BadStreamMessage
    dead = DeadLetters(cfg, lambda: js)
    dead.copy(m, seq, reason)              # once for the fleet, on <prefix>.dead.<seq>; never awaited
    await dead.drain()                     # before the connection closes

- **The same decision on every replica.** An event passes the API's own rules
  (`featurizer.contracts.event_rules.EventRules`: ranges, sizes, types and the future-time bound),
  the bound measured against the message's JetStream timestamp, never this process's clock; an
  item passes UpsertItems' rules (`ItemRules`). A refusal is counted by the field it names.
- **Dead letters.** A skipped message is copied to `<prefix>.dead.<seq>` with message id
  `dead-<seq>`, so JetStream's duplicate window keeps one copy however many replicas skip it
  (docs/scaling.md: inspecting and re-publishing them). An erased user's message is never copied
  (a copy would hold it again): their subject is purged again instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from featurizer.contracts.event_rules import EventRules, ItemRules, problem_field
from featurizer.erasure import Erasures
from featurizer.privacy import is_pseudonym
from serving.config import JetStreamConfig
from serving.ingest.log_format import LoggedEvent
from serving.ingest.stream_format import ORIGIN_HEADER, BadStreamMessage, SharedItem, decode_event, decode_item

log = logging.getLogger(__name__)

DEAD_SEQ_HEADER, DEAD_SUBJECT_HEADER, DEAD_REASON_HEADER = "Semrank-Dead-Seq", "Semrank-Dead-Subject", "Semrank-Dead-Reason"


class ErasedUser(Exception):
    """A stream message of a user erased on request (skipped by the fold)."""


class MessageChecks:
    """The fold's decision on one message: apply it, or skip it (and why). `refused`: the counts by
    reason it adds to (the fold's `FoldStats.refused`)."""

    def __init__(self, rules: EventRules, item_rules: ItemRules, refused: dict[str, int]):
        self.rules = rules  # what LogEvents accepts: the fold applies nothing else, whoever published it
        self.item_rules = item_rules  # what UpsertItems accepts, for item messages
        self.refused = refused
        self.pseudonymous = False  # the fleet's key is on: every event's user id must be a pseudonym
        self.item_known: Callable[[str], bool] | None = None  # the server's catalog (a new item needs a title)
        # Users erased on request (featurizer.erasure): their messages are skipped, counted under
        # "erased", never logged nor dead-lettered.
        self.erasures: Erasures | None = None

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def event(self, m) -> LoggedEvent:
        """The event of message `m` if the event rules accept it at the message's JetStream time (the
        same instant for every replica, so all make the same decision); else BadStreamMessage, or
        ErasedUser (counted under "erased") for a user erased on request."""
        event = decode_event(m.data)
        stamped = m.metadata.timestamp
        now_us = round(stamped.timestamp() * 1_000_000) if stamped is not None else 0
        problem = self.rules.problem(event, now_us)
        if problem is None and self.pseudonymous and not is_pseudonym(event.user_id):
            problem = "user_id: not a pseudonym, with the fleet's pseudonym key on (a producer published a raw id)"
        if problem is not None:
            self._count(problem_field(problem))
            raise BadStreamMessage(f"refused by the event rules: {problem}")
        if self.erasures and event.user_id in self.erasures:
            self._count("erased")
            raise ErasedUser()
        return event

    def item(self, m, headers) -> SharedItem:
        """The item row of message `m` if the item rules (UpsertItems') accept it; else BadStreamMessage."""
        item = decode_item(m.data, headers.get(ORIGIN_HEADER, ""))
        item_id = item.row.get("item_id")
        known = self.item_known is None or (isinstance(item_id, str) and self.item_known(item_id))
        problem = self.item_rules.problem(item.row, known)
        if problem is not None:
            self._count("item")
            raise BadStreamMessage(f"refused by the item rules: {problem}")
        return item


class DeadLetters:
    """Copies of skipped messages for operators, and the purges of erased users' subjects, in the
    background: the fold never waits on either (a failure is logged). `js`: the current JetStream
    context (it changes when NATS is made again); `enabled` False for a second fold of the stream
    (an erasure's rebuild), which copies and purges nothing."""

    def __init__(self, cfg: JetStreamConfig, js: Callable[[], object], enabled: bool = True):
        self.cfg, self._js, self.enabled = cfg, js, enabled
        self.prefix = f"{cfg.subject_prefix}.dead."  # `is_dead`: the fold skips these
        self._tasks: set[asyncio.Task] = set()

    def is_dead(self, subject: str) -> bool:
        return subject.startswith(self.prefix)

    def copy(self, m, seq: int, reason: str) -> None:
        """Copy skipped message `m` (stream seq `seq`) to `<prefix>.dead.<seq>`, once for the fleet:
        every replica that skips it publishes the copy with message id `dead-<seq>`."""
        if not self.enabled:
            return
        headers = {"Nats-Msg-Id": f"dead-{seq}", DEAD_SEQ_HEADER: str(seq), DEAD_SUBJECT_HEADER: m.subject,
                   DEAD_REASON_HEADER: reason[:500]}

        async def publish() -> None:
            try:
                await self._js().publish(f"{self.prefix}{seq}", m.data, headers=headers, timeout=self.cfg.publish_timeout_s)
            except Exception as e:  # noqa: BLE001 - NATS gone, or not allowed: the skip is logged by the fold
                log.warning("stream %s seq %d: the dead letter was not published (%s)", self.cfg.stream, seq,
                            type(e).__name__)

        self._spawn(publish())

    def purge_later(self, subject: str) -> None:
        """Purge an erased user's subject again (a producer published after the erasure)."""
        if not self.enabled:
            return

        async def purge() -> None:
            try:
                await asyncio.wait_for(self._js().purge_stream(self.cfg.stream, subject=subject),
                                       self.cfg.publish_timeout_s)
            except Exception as e:  # noqa: BLE001 - logged; the message stays skipped by every fold
                log.warning("stream %s: an erased user's subject was not purged (%s)", self.cfg.stream,
                            type(e).__name__)

        self._spawn(purge())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Let the copies and purges in flight finish (each bounded by `publish_timeout_s`)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
