"""Serving bundles: load, validate, swap atomically, retire.

- Each bundle's text tower is served by an encoder from `serving.encoding.pool.EncoderPool`
  (one per distinct encoder key, shared between bundles).
- `BundleRegistry.load(path)` loads a bundle, checks that this server can compute its
  features, starts (or shares) its encoder, embeds the catalog items it lacks, and scores
  a probe batch; any failure raises `BundleRejected` with the reason and changes nothing.
- `allowed_bundle_path(path, roots)` is what ReloadBundle accepts: a bundle directory under an
  allowed root, with one refusal message whatever the file system holds.
- `reload(path)` swaps the default bundle with one assignment: requests that already
  hold the old runtime finish on it; it is retired (encoder released) once they are done.
- `watch(poll_s)` reloads when the bundle directory (or the symlink pointing at it) changes;
  a rejected version is not retried until its files change again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featurizer.errors import SemrankError
from ranker.bundle import MANIFEST, BundleError, load_bundle
from ranker.sequence import BUNDLE_DIR as SEQUENCE_DIR
from ranker.sequence import CONFIG_FILE as SEQUENCE_CONFIG
from ranker.sequence import MODEL_FILE as SEQUENCE_MODEL
from ranker.user_tower import WEIGHTS_FILE
from serving.encoding.pool import EncoderHandle, EncoderPool
from serving.ranking.engine import BundleRuntime, RankingEngine, serving_inputs

log = logging.getLogger(__name__)

PROBE_ITEMS = 16


class BundleRejected(SemrankError, RuntimeError):
    """A bundle that cannot serve; the message says why. The serving bundle stays."""

    grpc_code = "FAILED_PRECONDITION"
    reason = "BUNDLE_REJECTED"


class BundlePathRefused(SemrankError):
    """A ReloadBundle path that is not a bundle directory under an allowed root. One message for
    every cause (outside the roots, missing, a file, unreadable, malformed), so that callers learn
    nothing about the server's files."""

    grpc_code = "INVALID_ARGUMENT"
    reason = "BUNDLE_PATH_REFUSED"

    def field_violations(self) -> list[tuple[str, str]]:
        return [("path", "not a bundle directory under the allowed roots")]


MAX_PATH_CHARS = 4096


def allowed_bundle_path(raw: str, roots: list[Path]) -> Path:
    """`raw` as a Path when it names a bundle directory (with a manifest) under one of `roots`: the
    path itself (`..` folded), or what its symlinks resolve to; else `BundlePathRefused`. Callers
    cannot create symlinks; ones an operator made under a root are trusted."""
    shown = raw if len(raw) <= 200 else raw[:200] + "..."
    refused = BundlePathRefused(f"path {shown!r} is not a bundle directory under the server's allowed bundle roots")
    if not raw or "\0" in raw or len(raw) > MAX_PATH_CHARS:
        raise refused
    try:
        given, real = Path(os.path.normpath(os.path.abspath(raw))), Path(os.path.realpath(raw))
        bases = [Path(os.path.normpath(os.path.abspath(r))) for r in roots] + [Path(os.path.realpath(r)) for r in roots]
        # Lexically under a root (a symlink an operator put there may point anywhere), or resolving into one.
        inside = any(p == b or b in p.parents for p in (given, real) for b in bases)
        if not inside or not (real / MANIFEST).is_file():
            raise refused
    except (OSError, ValueError):
        raise refused from None
    return Path(raw)


def bundle_fingerprint(path: Path) -> tuple:
    """What the watcher compares: the resolved directory and its files' mtimes and sizes."""
    real = path.resolve()
    parts: list = [str(real)]
    for name in (MANIFEST, "ranker.txt", WEIGHTS_FILE, f"{SEQUENCE_DIR}/{SEQUENCE_MODEL}", f"{SEQUENCE_DIR}/{SEQUENCE_CONFIG}"):
        try:
            st = os.stat(real / name)
            parts.append((name, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            parts.append((name, None, None))
    return tuple(parts)


@dataclass
class Loaded:
    runtime: BundleRuntime
    handle: EncoderHandle | None
    path: Path
    fingerprint: tuple
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


class BundleRegistry:
    def __init__(self, engine: RankingEngine, pool: EncoderPool, on_reload: Callable[[str, str], None] | None = None):
        self.engine = engine
        self.pool = pool
        self.default: Loaded | None = None
        self.variants: dict[Path, Loaded] = {}  # experiment bundles by resolved path
        self.default_path: Path | None = None
        self._rejected: tuple | None = None
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._on_reload = on_reload  # (result, version) -> None, for metrics

    # ------------------------------------------------------------ loading

    async def load(self, path: Path) -> Loaded:
        fp = bundle_fingerprint(path)
        try:
            # File reads and parsing off the event loop; the model parsed in a child first (a malformed
            # file aborts LightGBM's process, and this one serves).
            bundle = await asyncio.to_thread(load_bundle, path, True, True)
            serving_inputs(bundle, self.engine.online)  # can this server compute its inputs? (before starting an encoder)
        except BundleError as e:
            raise BundleRejected(str(e)) from e
        except Exception as e:  # noqa: BLE001 - anything unreadable is a rejected bundle
            raise BundleRejected(f"{path}: cannot load ({type(e).__name__}: {e})") from e
        handle = None
        try:
            needs_text = "interest_score" in bundle.feature_names
            if needs_text:
                try:
                    handle = await self.pool.acquire(bundle.encoder, bundle.path)
                except Exception as e:  # noqa: BLE001
                    raise BundleRejected(f"{path}: encoder {bundle.encoder.model_dir!r} cannot be served ({e})") from e
            rt = BundleRuntime(bundle, handle.key if handle else "", handle.encoder if handle else None)
            if handle is not None:
                n = await self.engine.items.ensure_embeddings(handle.key, handle.encoder.encode_bulk, handle.dim)
                if n:
                    log.info("embedded %d catalog item(s) with encoder %s", n, handle.key)
            await self._probe(rt)
        except BaseException:
            if handle is not None:
                await self.pool.release(handle)
            raise
        return Loaded(runtime=rt, handle=handle, path=path, fingerprint=fp)

    async def _probe(self, rt: BundleRuntime) -> None:
        """Score a few catalog items for an unknown user: the model must give finite scores."""
        items = self.engine.items.item_ids[:PROBE_ITEMS] or ["__probe_item__"]
        engine = self.engine
        user, t = "__semrank_probe__", engine.now()
        online = await engine.store_worker.read(engine.online.features, user, items, t)
        try:
            given = {"sequence_score": await engine.sequence_scores(rt, user, engine.items.rows(items), t, None, [])} \
                if rt.inputs.given else None
            scores = rt.bundle.score(rt.inputs.matrix(online, given))
        except Exception as e:  # noqa: BLE001
            raise BundleRejected(f"{rt.bundle.path}: scoring a probe batch failed ({type(e).__name__}: {e})") from e
        if not np.isfinite(scores).all():
            raise BundleRejected(f"{rt.bundle.path}: the model gives non-finite scores on a probe batch")

    async def start(self, default_path: Path, variant_paths: list[Path] = ()) -> None:
        self.default_path = default_path
        self.default = await self.load(default_path)
        for p in variant_paths:
            real = p.resolve()
            if real not in self.variants:
                self.variants[real] = await self.load(p)

    def runtimes(self) -> list:
        """The serving bundle runtimes: the default and each experiment's."""
        return [loaded.runtime for loaded in (self.default, *self.variants.values()) if loaded is not None]

    def variant(self, path: Path | None) -> Loaded:
        return self.default if path is None else self.variants[path.resolve()]

    # ------------------------------------------------------------ hot reload

    async def reload(self, path: Path | None = None) -> tuple[bool, str, str]:
        """(reloaded, version, message). A rejected bundle leaves the serving one in place."""
        async with self._reload_lock:
            path = Path(path) if path else self.default_path
            old = self.default
            fp = bundle_fingerprint(path)
            if old is not None and fp == old.fingerprint:
                return False, old.runtime.version, "unchanged"
            try:
                new = await self.load(path)
            except BundleRejected as e:
                self._rejected = fp
                log.error("bundle rejected, still serving %s: %s", old.runtime.version if old else None, e)
                self._notify("rejected", "")
                return False, old.runtime.version if old else "", str(e)
            self.default, self.default_path = new, path
            self._rejected = None
            log.info("bundle %s now serving (was %s)", new.runtime.version, old.runtime.version if old else None)
            self._notify("ok", new.runtime.version)
            if old is not None:
                task = asyncio.create_task(self._retire(old))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            return True, new.runtime.version, "reloaded"

    def _notify(self, result: str, version: str) -> None:
        if self._on_reload is not None:
            self._on_reload(result, version)

    async def _retire(self, old: Loaded, poll_s: float = 0.01, max_wait_s: float = 60.0) -> None:
        waited = 0.0
        while old.runtime.inflight > 0 and waited < max_wait_s:
            await asyncio.sleep(poll_s)
            waited += poll_s
        if old.handle is not None:
            await self.pool.release(old.handle)

    async def watch(self, poll_s: float) -> None:
        """Poll the default bundle path; reload when its files change (until cancelled)."""
        while True:
            await asyncio.sleep(poll_s)
            try:
                fp = bundle_fingerprint(self.default_path)
                if fp != self.default.fingerprint and fp != self._rejected:
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("bundle watcher")

    async def close(self) -> None:
        for t in list(self._retiring):
            await t
        await self.pool.close()
