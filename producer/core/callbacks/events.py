"""Callback messages (what goes on the ``callbacks`` queue for the delivery task to sign and POST) and the records
a delivery leaves behind: one :class:`DeliveryRecord` per attempt, a :class:`CallbackDeadLetter` per event given up.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from producer.contract import Callback, EventType, FineTuneJob, GenerateJob, JobView, WebhookEvent
from producer.core.callbacks.signing import msg_id_for
from producer.core.clock import utcnow


class CallbackMessage(BaseModel):
    """One event to deliver to one URL; ``msg_id`` stays the same across retries of this event.

    A retry is the same message sent again with ``attempt`` counted up and ``due_at`` set: a worker that receives
    it before ``due_at`` puts it back to wait (see ``producer.core.callbacks.delivery``).
    """

    job_id: str
    url: str
    msg_id: str
    event: WebhookEvent
    attempt: int = Field(default=1, ge=1, description="1 for the first attempt, counted up on each retry.")
    due_at: datetime | None = Field(default=None, description="Not to be attempted before this time (a retry).")


class DeliveryRecord(BaseModel):
    """One attempt to deliver a callback event, kept beside the job (``genq:job:<id>:events``) for the API to list."""

    msg_id: str = Field(description="The `webhook-id`: the same on every attempt of one event.")
    type: str = Field(description="The event type (queued, running, progress, succeeded, failed, canceled).")
    url: str
    attempt: int = Field(default=1, description="1 for the first attempt of this event.")
    ok: bool = Field(description="The receiver answered 2xx.")
    sent: bool = Field(default=True, description="False when genq refused to send (410 earlier, unsafe address).")
    status_code: int | None = None
    error: str | None = None
    duration_ms: float = 0.0
    at: datetime
    next_retry_at: datetime | None = Field(default=None, description="When the next attempt is due; null if none.")
    dead_lettered: bool = Field(default=False, description="The retry window is used up: this event is given up.")


class CallbackDeadLetter(BaseModel):
    """An event whose every attempt failed (``genq:callbacks:dead``): enough to inspect it and send it again."""

    message: CallbackMessage
    attempts: int
    last_error: str | None
    last_status_code: int | None
    at: datetime


def wants(job: GenerateJob | FineTuneJob, event: EventType) -> bool:
    """Whether ``job``'s callback asks for ``event`` (no callback: none)."""
    return job.callback is not None and event in job.callback.events


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
        event=WebhookEvent(type=event_type, timestamp=utcnow(), seq=seq, data=view),
    )
