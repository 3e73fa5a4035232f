"""One serving bundle for every replica: a bundle reload on one reaches all, through JetStream's KV.

    shared = SharedBundle(js, cfg, registry)
    await shared.start()              # adopt the fleet's bundle if it differs from the one loaded
    registry on_reload "ok" -> shared.reloaded_here()   # RPC or watcher: tell the others
    task = asyncio.create_task(shared.follow(1.0))      # reload when another replica did

With `--events jetstream`, bucket `<stream>_CONTROL` (serving.ingest.control), key `bundle`, holds the fleet's bundle as
JSON: `{"path": ..., "version": ..., "origin": <replica>, "at": <unix time>}`. A replica that
reloads (ReloadBundle, or its watcher seeing the bundle directory change) puts it; every replica
polls the key and reloads to each new revision once, from the same path, which must be the same
bundle on every host (a shared volume, or the same deployment path). The key obeys the rules of
ReloadBundle: a path that is not a bundle directory under the replica's `--bundle-root` is refused
and logged (a writer of the bucket cannot make replicas load from anywhere). A replica where that
path fails to load keeps serving its bundle and logs why (the fleet then serves two versions, which
`semrank_bundle_info` shows per replica); one that starts later adopts the fleet's bundle before it
answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import nats.js.errors

from serving.aio import cancel_and_wait
from serving.config import JetStreamConfig
from serving.ingest.control import control_bucket
from serving.ranking.registry import BundlePathRefused, BundleRegistry, allowed_bundle_path

log = logging.getLogger(__name__)

KEY = "bundle"


class SharedBundle:
    def __init__(self, js, cfg: JetStreamConfig, registry: BundleRegistry, origin: str, bundle_roots: list[Path]):
        self.js, self.cfg, self.registry, self.origin = js, cfg, registry, origin
        self.bundle_roots = bundle_roots  # what the key may name: the roots ReloadBundle accepts (--bundle-root)
        self.refused = 0  # revisions refused for a path outside them
        self._kv = None
        self._acted = 0  # the last revision of the key this replica acted on (or put itself)
        self._puts: set[asyncio.Task] = set()

    def _local(self) -> tuple[str, str]:
        return str(Path(self.registry.default_path).resolve()), self.registry.default.runtime.version

    async def _bucket(self):
        if self._kv is None:
            self._kv = await control_bucket(self.js, self.cfg)
        return self._kv

    async def _get(self) -> tuple[int, dict] | None:
        try:
            entry = await (await self._bucket()).get(KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        try:
            return entry.revision, json.loads(entry.value)
        except ValueError:
            log.error("shared bundle: key %s holds no JSON; ignored", KEY)
            return entry.revision, {}

    async def start(self) -> None:
        """Adopt the fleet's bundle (or publish this one when there is none yet)."""
        if await self._get() is None:
            await self._put()
        else:
            await self.poll()

    async def poll(self) -> bool:
        """Reload to a new revision put by another replica; returns whether this replica reloaded."""
        got = await self._get()
        if got is None or got[0] <= self._acted:
            return False
        rev, want = got
        self._acted = rev
        path, version = want.get("path"), want.get("version")
        if not path or (path, version) == self._local():
            return False
        try:
            allowed = allowed_bundle_path(path if isinstance(path, str) else "", self.bundle_roots)
        except BundlePathRefused:
            self.refused += 1
            log.error("the fleet's bundle key (revision %d) names %r, which is not a bundle directory under this "
                      "replica's --bundle-root; refused, still serving %s", rev, str(path)[:200],
                      self.registry.default.runtime.version)
            return False
        log.info("the fleet's bundle is %s at %s (set by another replica): reloading", version, allowed)
        ok, now, message = await self.registry.reload(allowed)
        if not ok:
            log.error("shared bundle %s at %s was not loaded here (%s): still serving %s", version, path, message,
                      self.registry.default.runtime.version)
        return ok

    def reloaded_here(self) -> None:
        """The registry reloaded (ReloadBundle, the watcher, or `poll`): share it unless the key holds it."""
        task = asyncio.get_running_loop().create_task(self._put())
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    async def _put(self) -> None:
        path, version = self._local()
        try:
            got = await self._get()
            if got is not None and (got[1].get("path"), got[1].get("version")) == (path, version):
                self._acted = max(self._acted, got[0])
                return
            rev = await (await self._bucket()).put(KEY, json.dumps(
                {"path": path, "version": version, "origin": self.origin, "at": time.time()}).encode())
            self._acted = max(self._acted, rev)
            log.info("shared bundle %s at %s with the other replicas (revision %d)", version, path, rev)
        except Exception as e:  # noqa: BLE001 - NATS down: the next reload shares it; logged
            log.warning("could not share bundle %s with the other replicas (%s)", version, type(e).__name__)

    async def follow(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - NATS down: try again later
                log.debug("shared bundle poll failed: %s", e)

    async def close(self) -> None:
        await cancel_and_wait(list(self._puts))
