"""Publish/subscribe fan-out and recent-message history for the real-time features.

Every process delivers to its own subscribers from local bounded queues. With Redis,
``publish`` goes through one Redis channel space and each process runs a single pump
(one pattern subscription) that feeds its local queues, so a message published on any
replica reaches subscribers on every replica. A subscriber whose queue is full loses
messages (counted) instead of slowing everyone else down.

A process delivers what it publishes to its own subscribers itself, at once, and its pump
skips those messages when Redis passes them back: whether Redis passes them back at all
depends on the pump holding its subscription, which it does not between a Redis restart
and its re-subscription. So the members on the sender's process get every message exactly
once whatever Redis does; other processes miss what is published while their pump is down.
A process tells its own messages by their bytes, and remembers those Redis never passed
back: every message published on a channel must differ from every other (those of the
service carry an id, presence events a time to the microsecond), or another process's
identical one would be skipped for it.

While Redis is unreachable, messages are delivered locally only and history is empty:
chat degrades to "this replica", it does not fail.
"""

import asyncio
import contextlib
import hashlib
from collections import OrderedDict, defaultdict, deque
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
# How many of its own messages a process remembers for its pump to skip. The pump sees one
# back within milliseconds; only those Redis never passes back (published while the pump
# was not subscribed) wait here until pushed out, so this bounds their memory.
OWN_MESSAGES_REMEMBERED = 10_000


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


class OwnMessages:
    """The messages this process delivered itself when publishing them, as digests (a
    message may be 8 KiB), counted: identical messages may be published twice."""

    def __init__(self, size: int = OWN_MESSAGES_REMEMBERED) -> None:
        self.size = size
        self.counts: OrderedDict[bytes, int] = OrderedDict()

    def add(self, channel: str, message: bytes) -> None:
        key = _digest(channel, message)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.counts.move_to_end(key)
        if len(self.counts) > self.size:
            self.counts.popitem(last=False)

    def take(self, channel: str, message: bytes) -> bool:
        """Whether the message is one of ours (forgotten now): the pump skips it."""
        key = _digest(channel, message)
        count = self.counts.get(key)
        if count is None:
            return False
        if count == 1:
            del self.counts[key]
        else:
            self.counts[key] = count - 1
        return True


def _digest(channel: str, message: bytes) -> bytes:
    # The channel too: identical bytes go to several channels (a private message to its
    # sender's and its recipient's).
    digest = hashlib.blake2b(channel.encode(), digest_size=16)
    digest.update(b"\0")
    digest.update(message)
    return digest.digest()


class RedisBroker(LocalFanout):
    def __init__(self, redis: RedisBackend, reconnect_seconds: float = 1.0) -> None:
        super().__init__()
        self.redis = redis
        self.reconnect_seconds = reconnect_seconds
        self.own = OwnMessages()

    async def publish(self, channel: str, message: bytes) -> None:
        # Delivered here first: a PUBLISH that succeeds says nothing about this process's
        # pump being subscribed, and one that fails may still have reached Redis.
        self.deliver(channel, message)
        self.own.add(channel, message)
        try:
            await self.redis.call(lambda client: client.publish(CHANNEL_PREFIX + channel, message))
        except RedisUnavailable:
            logger.warning("broker: redis unavailable, delivered locally", channel=channel)

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
                            if not self.own.take(channel, message["data"]):
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
