from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class CacheEpoch(Base):
    """One row: the cache namespace generation, durable in the database.

    A write whose cache invalidation could not reach Redis bumps it; every process
    pushes it into Redis (on each new Redis connection and periodically) before reading
    there, so a Redis that comes back with its old data cannot serve what that write
    changed.
    """

    __tablename__ = "cache_epoch"

    id: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[int] = mapped_column(default=0)
