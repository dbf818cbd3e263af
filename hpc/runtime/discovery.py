"""etcd discovery: registrations kept alive under a lease, and a live directory of workers from a watch.

A worker that dies stops refreshing its lease; etcd deletes its keys after the TTL and every watcher hears it."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable
from urllib.parse import urlparse

import aetcd

from hpc.errors import HpcError
from hpc.runtime.protocol import WorkerInfo, decode_worker_info

log = logging.getLogger(__name__)


def etcd_client(url: str, timeout: float = 5.0, credentials=None) -> aetcd.Client:
    u = urlparse(url if "://" in url else f"http://{url}")
    user, password = (credentials.etcd_user, credentials.etcd_password) if credentials else (None, None)
    return aetcd.Client(host=u.hostname or "127.0.0.1", port=u.port or 2379, timeout=timeout, username=user,
                        password=password)


async def connect(url: str, timeout: float = 5.0, credentials=None, deployment: str | None = None) -> aetcd.Client:
    """A client, checked with a read (of the deployment's own prefix: with credentials, that is all it may read)."""
    client = etcd_client(url, timeout, credentials)
    probe = f"/hpc/{deployment}/ping" if deployment else "/hpc/ping"
    try:
        await asyncio.wait_for(client.get(probe.encode()), timeout)
    except Exception as e:
        await client.close()
        raise HpcError(f"cannot reach etcd at {url}: {str(e) or type(e).__name__}") from None
    return client


def auth_expired(error: Exception) -> bool:
    """etcd forgot this client's token (it restarted, or the token's TTL ran out)."""
    return "auth token" in str(error) or isinstance(error, aetcd.exceptions.UnauthenticatedError)


async def reauthenticate(client: aetcd.Client) -> None:
    """Drop the connection: the client's next call connects and authenticates again."""
    try:
        await asyncio.wait_for(client.close(), 5)
    except Exception:
        pass


class Registration:
    """Keys attached to one lease, refreshed every ttl/3. If the lease is lost (etcd restarted, a long pause),
    a new one is granted and the keys are written again."""

    def __init__(self, client: aetcd.Client, items: dict[str, bytes], ttl: int):
        self.client, self.items, self.ttl = client, items, ttl
        self.lease = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._put_all()
        self._task = asyncio.create_task(self._keepalive())

    async def _put_all(self) -> None:
        self.lease = await asyncio.wait_for(self.client.lease(self.ttl), 5)
        for key, value in self.items.items():
            await asyncio.wait_for(self.client.put(key.encode(), value, lease=self.lease), 5)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                reply = await asyncio.wait_for(self.lease.refresh(), 5)
                if reply is None or reply.TTL <= 0:
                    log.warning("etcd lease %x expired; registering again", self.lease.id)
                    await self._put_all()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd unreachable for now: keep trying; the lease may still hold
                log.warning("etcd keepalive failed: %s", e)
                if auth_expired(e):
                    await reauthenticate(self.client)

    async def update(self, key: str, value: bytes) -> None:
        self.items[key] = value
        await asyncio.wait_for(self.client.put(key.encode(), value, lease=self.lease), 5)

    async def revoke(self) -> None:
        if self._task:
            self._task.cancel()
        if self.lease is not None:
            try:
                await asyncio.wait_for(self.lease.revoke(), 5)
            except Exception as e:
                log.warning("could not revoke the etcd lease (it will expire by itself): %s", e)


class WorkerDirectory:
    """The live set of workers of a deployment: a snapshot, then a watch; re-synced after any watch failure.

    A worker found dead before its lease ends (NATS says nothing serves its subject any more) is `lost`: left out
    at once, until it registers again or answers once more (a NATS reconnect, not a death)."""

    def __init__(self, client: aetcd.Client, prefix: str):
        self.client, self.prefix = client, prefix
        self.workers: dict[str, WorkerInfo] = {}  # what etcd holds, less the lost
        self._by_role: dict[tuple[str, str | None], tuple[WorkerInfo, ...]] = {}
        self._registered: dict[str, WorkerInfo] = {}  # what etcd holds
        self.lost_ids: set[str] = set()
        self._gone: dict[str, asyncio.Future] = {}
        self._listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task | None = None
        self._stopped = False
        self.synced = asyncio.Event()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def gone(self, worker_id: str) -> asyncio.Future:
        """Done when the worker leaves: requests waiting on it fail at once instead of at their timeout. A future,
        not an Event, so a waiter adds a callback instead of starting a task per request."""
        fut = self._gone.get(worker_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            if any(w.worker_id == worker_id for w in self.workers.values()):
                self._gone[worker_id] = fut  # completed and dropped when the worker leaves
            else:
                fut.set_result(None)
        return fut

    def by_role(self, role: str, model: str | None = None) -> tuple[WorkerInfo, ...]:
        """The workers a request of this role may go to (a draining worker is still here, but takes no more).
        Asked several times per request: kept until the set of workers changes."""
        found = self._by_role.get((role, model))
        if found is None:
            found = self._by_role[role, model] = tuple(sorted(
                (w for w in self.workers.values() if w.role == role and not w.draining
                 and (model is None or w.model == model)), key=lambda w: w.worker_id))
        return found

    def models(self) -> set[str]:
        return {w.model for w in self.workers.values()}

    async def refresh(self) -> int:
        """Read every registration now; returns the etcd revision read."""
        result = await asyncio.wait_for(self.client.get_prefix(self.prefix.encode()), 5)
        fresh = {}
        for kv in result:
            try:
                info = decode_worker_info(kv.value)
            except Exception:
                log.warning("ignoring malformed registration %s", kv.key)
                continue
            fresh[kv.key.decode()] = info
        self._replace(fresh)
        self.synced.set()
        return result.header.revision if result.header else 0

    def lost(self, worker_id: str) -> None:
        """Leave out a worker found dead before etcd says so; its waiters fail now."""
        if worker_id not in self.lost_ids:
            self.lost_ids.add(worker_id)
            self._replace(self._registered)

    def found(self, worker_id: str) -> None:
        if worker_id in self.lost_ids:
            self.lost_ids.discard(worker_id)
            self._replace(self._registered)

    def lost_workers(self) -> list[WorkerInfo]:
        return [w for w in self._registered.values() if w.worker_id in self.lost_ids]

    def _replace(self, fresh: dict[str, WorkerInfo]) -> None:
        before = {w.worker_id for w in self.workers.values()}
        self._registered = fresh
        registered = {w.worker_id for w in fresh.values()}
        self.lost_ids &= registered  # a lost worker whose lease has ended is simply gone
        self.workers = {k: w for k, w in fresh.items() if w.worker_id not in self.lost_ids}
        self._by_role = {}
        after = {w.worker_id for w in self.workers.values()}
        for wid in before - after:
            fut = self._gone.pop(wid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        for fn in self._listeners:
            fn()

    async def _run(self) -> None:
        revision = None
        while True:
            try:
                if revision is None:
                    revision = await self.refresh()
                watch = await self.client.watch_prefix(self.prefix.encode(), start_revision=revision + 1)
                async for event in watch:
                    fresh = dict(self._registered)
                    key = event.kv.key.decode()
                    if event.kind == "PUT":
                        try:
                            fresh[key] = decode_worker_info(event.kv.value)
                        except Exception:
                            continue
                        self.lost_ids.discard(fresh[key].worker_id)  # registered again: a new process
                    else:
                        fresh.pop(key, None)
                    revision = event.kv.mod_revision
                    self._replace(fresh)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self._stopped:  # aetcd reports our own cancellation as an error: do not reconnect
                    return
                log.warning("etcd watch on %s failed (%s); re-syncing", self.prefix, str(e) or type(e).__name__)
                if auth_expired(e):
                    await reauthenticate(self.client)
                revision = None
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Stop watching, and wait until the watch task has ended (before the client closes)."""
        self._stopped = True
        if self._task:
            self._task.cancel()
            try:
                await asyncio.wait_for(self._task, 3)
            except BaseException:  # cancelled, timed out, or it failed: it is over either way
                pass
