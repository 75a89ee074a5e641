"""`genq worker -Q`: a priority served only in part is said at start."""

from __future__ import annotations

from producer.cli.worker import unpaired_queues
from producer.core import constants


def test_every_default_queue_list_and_every_whole_priority_is_served_without_a_warning() -> None:
    assert unpaired_queues(list(constants.WORKER_QUEUES)) == []
    assert unpaired_queues(["generate.low", "generate.low.bulk"]) == []
    assert unpaired_queues(["callbacks"]) == unpaired_queues(["train"]) == []


def test_a_small_queue_without_its_bulk_queue_or_the_reverse_is_named_with_the_order_to_serve_them() -> None:
    warnings = unpaired_queues(["generate.high", "generate", "generate.low.bulk"])

    assert len(warnings) == 3
    assert "'generate.high' but not 'generate.high.bulk'" in warnings[0] and "more than 64 images" in warnings[0]
    assert "'generate' but not 'generate.bulk'" in warnings[1] and "generate,generate.bulk" in warnings[1]
    assert "'generate.low.bulk' but not 'generate.low'" in warnings[2] and "at most 64 images" in warnings[2]
