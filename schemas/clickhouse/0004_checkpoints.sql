-- Where each partition's processing stands: written after a batch's rows and before its Kafka offsets are
-- committed, so a restarted worker knows which windows are already final. The furthest-along row per
-- partition wins (every checkpoint is true of the stream prefix it covers).
CREATE TABLE IF NOT EXISTS pipeline_checkpoints
(
    consumer_group String,
    topic String,
    partition UInt16,
    commit_offset UInt64,
    read_offset UInt64,
    watermark_ms Int64,
    closed_before_ms Int64,
    written_at_ms UInt64
)
ENGINE = ReplacingMergeTree(read_offset)
ORDER BY (consumer_group, topic, partition);
