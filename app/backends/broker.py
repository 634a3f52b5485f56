"""Publish/subscribe fan-out and recent-message history for the real-time features.

Every process delivers to its own subscribers from local bounded queues. With Redis,
``publish`` goes through one Redis channel space and each process runs a single pump
(one connection, subscribed by pattern) that feeds its local queues, so a message
published on any replica reaches subscribers on every replica. A subscriber whose queue
is full loses messages (counted) instead of slowing everyone else down.

A process delivers what it publishes to its own subscribers itself, at once, and its pump
skips those messages when Redis passes them back: whether Redis passes them back at all
depends on the pump holding its subscription, which it does not between a Redis restart
and its re-subscription. So the members on the sender's process get every message exactly
once whatever Redis does; other processes miss what is published while their pump is down.

A process tells its own messages by where they come from, not by what they say. Each
broker draws a random origin when it starts and publishes every message right after an
announcement on its origin's channel (``rt-origin:<hex>``) that names the message's
channel, both from one script. Its pump subscribes to that channel and to the messages in
one command, and no other client's command runs between the two PUBLISHes of a script: an
announcement the pump gets is followed by the message it announces, which the pump skips.
So it is exact under any load and for any bytes, with nothing remembered: identical
messages from other processes are all delivered. (Telling them by their bytes, as earlier
releases did, took a memory of what was sent: a burst larger than it came back as
strangers' and was delivered twice, and a message Redis never passed back hid the same
bytes published elsewhere later.)

The messages go out as they always did, the bytes alone on ``rt:<channel>``, and the
announcements on channels that the ``rt:*`` pattern does not match. During a rolling
deploy the replicas of an earlier release, which read that pattern and hand the bytes to
their clients as they are, exchange every message with this release's and never see an
announcement. They still tell their own messages by their bytes, so every message the
service publishes stays unique (an id in each, a time to the microsecond in presence
events). A Redis ACL that limits the service's channels must allow ``rt-origin:*`` too.

While Redis is unreachable, messages are delivered locally only and history is empty:
chat degrades to "this replica", it does not fail.
"""

import asyncio
import contextlib
import secrets
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
# A broker's announcements of its own messages: outside CHANNEL_PREFIX's pattern, where
# no pump of an earlier release looks.
ORIGIN_PREFIX = "rt-origin:"
HISTORY_PREFIX = "history:"
# A message and, right before it, its announcement: Redis runs a script whole, so no other
# client's command comes between the two. (As a MULTI/EXEC transaction, at about half
# the client's work per message.)
_PUBLISH = """
redis.call('PUBLISH', ARGV[1], ARGV[2])
return redis.call('PUBLISH', ARGV[2], ARGV[3])
"""


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
        # This instance's own announcement channel; hex, so no glob character in the
        # pattern the pump subscribes to it with.
        self.origin = ORIGIN_PREFIX + secrets.token_hex(8)
        self._publish = redis.client.register_script(_PUBLISH)

    async def publish(self, channel: str, message: bytes) -> None:
        # Delivered here first: a PUBLISH that succeeds says nothing about this process's
        # pump being subscribed, and one that fails may still have reached Redis (then its
        # announcement did too: the pump skips it all the same).
        self.deliver(channel, message)
        args = [self.origin, CHANNEL_PREFIX + channel, message]
        try:
            await self.redis.call(lambda _: self._publish(args=args))
        except RedisUnavailable:
            logger.warning("broker: redis unavailable, delivered locally", channel=channel)

    async def run(self) -> None:
        """The pump: Redis messages into local queues, reconnecting until cancelled."""
        outage = OutageLog(
            logger, "broker: redis subscription lost", "broker: redis subscription restored"
        )
        origin = self.origin.encode()
        while True:
            try:
                async with self.redis.client.pubsub() as pubsub:
                    # One command: both subscriptions start at the same point, so every
                    # own message the pump gets comes right after its announcement.
                    await pubsub.psubscribe(CHANNEL_PREFIX + "*", self.origin)
                    outage.succeeded()
                    announced: bytes | None = None  # the channel of our message up next
                    async for message in pubsub.listen():
                        if message["type"] != "pmessage":
                            announced = None  # (re)subscribed: a new stream
                            continue
                        name = message["channel"]
                        if name == origin:
                            announced = message["data"]
                            continue
                        own, announced = name == announced, None
                        if not own:
                            channel = name.decode()[len(CHANNEL_PREFIX) :]
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
