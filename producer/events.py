"""Callback messages: what goes on the ``callbacks`` queue for the delivery task to sign and POST."""

from __future__ import annotations

from pydantic import BaseModel

from producer.contract import Callback, EventType, JobView, WebhookEvent
from producer.status import utcnow
from producer.webhooks import msg_id_for


class CallbackMessage(BaseModel):
    """One event to deliver to one URL; ``msg_id`` stays the same across retries of this event."""

    job_id: str
    url: str
    msg_id: str
    event: WebhookEvent


def callback_message(
    callback: Callback | None, event_type: EventType, view: JobView, seq: int
) -> CallbackMessage | None:
    """The message for ``event_type``, or None when the job has no callback or filters the event out."""
    if callback is None or event_type not in callback.events:
        return None
    return CallbackMessage(
        job_id=view.id,
        url=str(callback.url),
        msg_id=msg_id_for(view.id, event_type, seq),
        event=WebhookEvent(type=event_type, timestamp=utcnow(), data=view),
    )
