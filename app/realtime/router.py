"""The chat and notification sockets, and the admin route that sends notifications."""

from fastapi import APIRouter, WebSocket, status

from app.auth.deps import NotificationSender
from app.background import JobsDep
from app.db import SessionDep
from app.email import MailerDep
from app.realtime.deps import RealtimeDep, RoomName, admitted
from app.realtime.schemas import Notification, NotificationCreate
from app.users import service as users_service

router = APIRouter(tags=["realtime"])


@router.websocket("/ws/chat/{room}")
async def chat(websocket: WebSocket, room: RoomName, realtime: RealtimeDep) -> None:
    async with admitted(websocket) as socket_user:
        if socket_user is not None:
            await realtime.chat(websocket, socket_user, room)


@router.websocket("/ws/notifications")
async def notifications(websocket: WebSocket, realtime: RealtimeDep) -> None:
    async with admitted(websocket) as socket_user:
        if socket_user is not None:
            await realtime.notifications(websocket, socket_user)


@router.post("/notifications", status_code=status.HTTP_202_ACCEPTED, response_model=Notification)
async def send_notification(
    data: NotificationCreate,
    _: NotificationSender,
    session: SessionDep,
    realtime: RealtimeDep,
    jobs: JobsDep,
    mailer: MailerDep,
) -> Notification:
    """Push to the notification sockets; a notification to one user is also e-mailed."""
    notification = await realtime.notify(session, data)
    if data.user_id is not None:
        recipient = await users_service.get_user(session, data.user_id)
        jobs.spawn("email", mailer.send(recipient.email, data.title, data.body))
    return notification
