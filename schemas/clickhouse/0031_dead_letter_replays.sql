-- Dead letters re-published to the touchpoint topic by `touchpoint deadletters replay`, by their place in the
-- dead-letter topic: a second replay skips them (the worker would not count them twice anyway: an event id
-- counts once per window and touchpoints folds copies by event id), and operators can see what was replayed.
CREATE TABLE IF NOT EXISTS dead_letter_replays
(
    dead_letter_topic String,
    dead_letter_partition UInt16,
    dead_letter_offset UInt64,
    event_id String,
    reason String,
    target_topic String,
    replayed_at_ms UInt64
)
ENGINE = ReplacingMergeTree(replayed_at_ms)
ORDER BY (dead_letter_topic, dead_letter_partition, dead_letter_offset);
