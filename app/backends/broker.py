"""Publish/subscribe fan-out and recent-message history for the real-time features.

Every process delivers to its own subscribers from local bounded queues. With Redis,
``publish`` goes through one Redis channel space and each process runs a single pump
(one pattern subscription) that feeds its local queues, so a message published on any
replica reaches subscribers on every replica. A subscriber whose queue is full loses
messages (counted) instead of slowing everyone else down.

While Redis is unreachable, messages are delivered locally only and history is empty:
chat degrades to "this replica", it does not fail.
"""

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from typing import Protocol

from redis.exceptions import RedisError

from app.backends.redis import RedisBackend, RedisUnavailable
from app.observability.logging import get_logger
from app.observability.metrics import REALTIME_DROPPED
from app.observability.outages import OutageLog

logger = get_logger(__name__)

CHANNEL_PREFIX = "rt:"
HISTORY_PREFIX = "history:"


class Subscription:
    """One subscriber's bounded inbox."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=size)
        self.dropped = 0

    def offer(self, message: bytes) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            REALTIME_DROPPED.inc()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        return await self.queue.get()


class Broker(Protocol):
    async def publish(self, channel: str, message: bytes) -> None: ...

    def subscribe(
        self, channel: str, queue_size: int = 256
    ) -> contextlib.AbstractAsyncContextManager[Subscription]: ...


class LocalFanout:
    """Delivery to this process's subscribers; the whole broker when there is no Redis."""

    def __init__(self) -> None:
        self.subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)

    def deliver(self, channel: str, message: bytes) -> None:
        for subscription in tuple(self.subscribers.get(channel, ())):
            subscription.offer(message)

    async def publish(self, channel: str, message: bytes) -> None:
        self.deliver(channel, message)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str, queue_size: int = 256) -> AsyncIterator[Subscription]:
        subscription = Subscription(queue_size)
        self.subscribers[channel].add(subscription)
        try:
            yield subscription
        finally:
            self.subscribers[channel].discard(subscription)
            if not self.subscribers[channel]:
                del self.subscribers[channel]


class RedisBroker(LocalFanout):
    def __init__(self, redis: RedisBackend, reconnect_seconds: float = 1.0) -> None:
        super().__init__()
        self.redis = redis
        self.reconnect_seconds = reconnect_seconds

    async def publish(self, channel: str, message: bytes) -> None:
        try:
            await self.redis.call(lambda client: client.publish(CHANNEL_PREFIX + channel, message))
        except RedisUnavailable:
            logger.warning("broker: redis unavailable, delivering locally", channel=channel)
            self.deliver(channel, message)

    async def run(self) -> None:
        """The pump: Redis messages into local queues, reconnecting until cancelled."""
        outage = OutageLog(
            logger, "broker: redis subscription lost", "broker: redis subscription restored"
        )
        while True:
            try:
                async with self.redis.client.pubsub() as pubsub:
                    await pubsub.psubscribe(CHANNEL_PREFIX + "*")
                    outage.succeeded()
                    async for message in pubsub.listen():
                        if message["type"] == "pmessage":
                            channel = message["channel"].decode()[len(CHANNEL_PREFIX) :]
                            self.deliver(channel, message["data"])
            except (RedisError, OSError) as exc:
                outage.failed(error=str(exc))
            await asyncio.sleep(self.reconnect_seconds)


class History(Protocol):
    async def append(self, room: str, message: bytes) -> None: ...

    async def recent(self, room: str) -> list[bytes]: ...


class MemoryHistory:
    def __init__(self, size: int = 50) -> None:
        self.rooms: defaultdict[str, deque[bytes]] = defaultdict(lambda: deque(maxlen=size))

    async def append(self, room: str, message: bytes) -> None:
        self.rooms[room].append(message)

    async def recent(self, room: str) -> list[bytes]:
        return list(self.rooms.get(room, ()))


class RedisHistory:
    def __init__(self, redis: RedisBackend, size: int = 50, ttl_seconds: int = 7 * 86_400) -> None:
        self.redis = redis
        self.size = size
        self.ttl_seconds = ttl_seconds

    async def append(self, room: str, message: bytes) -> None:
        key = HISTORY_PREFIX + room

        async def push(client: object) -> None:
            async with self.redis.client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, message).ltrim(key, -self.size, -1).expire(key, self.ttl_seconds)
                await pipe.execute()

        with contextlib.suppress(RedisUnavailable):
            await self.redis.call(push)

    async def recent(self, room: str) -> list[bytes]:
        try:
            return await self.redis.call(
                lambda client: client.lrange(HISTORY_PREFIX + room, -self.size, -1)
            )
        except RedisUnavailable:
            return []
