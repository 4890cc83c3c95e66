"""The worker's offsets port on Faust's consumer, without a broker: a partition revoked by a rebalance has no
high watermark here (aiokafka asserts on it), so the runner's progress report cannot crash the worker."""

from __future__ import annotations

from typing import Any

from faust.types import TP

from pipeline.adapters.worker import KafkaOffsets


class _Consumer:
    """aiokafka's behaviour as Faust's consumer passes it on: the high watermark of an assigned partition only."""

    def __init__(self, assigned: set[TP], revoke_on_call: bool = False) -> None:
        self.assigned = assigned
        self.revoke_on_call = revoke_on_call

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def highwater(self, tp: TP) -> int:
        if self.revoke_on_call:
            self.assigned.discard(tp)
        assert tp in self.assigned, "Partition is not assigned"
        return 42


def _offsets(consumer: _Consumer) -> KafkaOffsets:
    offsets: Any = consumer
    return KafkaOffsets(offsets, "touchpoints")


def test_the_high_watermark_of_an_assigned_partition_is_read() -> None:
    assert _offsets(_Consumer({TP("touchpoints", 0)})).highwater(0) == 42


def test_a_partition_revoked_before_or_during_the_read_has_no_high_watermark() -> None:
    assert _offsets(_Consumer({TP("touchpoints", 0)})).highwater(1) is None
    assert _offsets(_Consumer({TP("touchpoints", 1)}, revoke_on_call=True)).highwater(1) is None
