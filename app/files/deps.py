from typing import Annotated

from fastapi import Depends, Request

from app.auth.deps import CurrentUser
from app.backends.storage import Storage
from app.rate_limits import RatePolicyDep


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


StorageDep = Annotated[Storage, Depends(get_storage)]


async def upload_limit(user: CurrentUser, policy: RatePolicyDep) -> None:
    """Per user, not per address: uploads need an account, and users behind one NAT
    must not share a budget."""
    await policy.enforce("uploads", policy.limits.uploads, f"user:{user.id}")
