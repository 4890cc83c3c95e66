-- The watermark and closed horizon from just before the record at commit_offset: a worker that resumes there
-- re-decides each replayed event's fate (on time or late) exactly as the first run did. NULL in checkpoints
-- written before: the worker then takes watermark_ms and closed_before_ms. One statement, so it applies whole
-- or not at all (ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS; the migration runner skips it when both
-- columns exist).
ALTER TABLE pipeline_checkpoints
    ADD COLUMN replay_watermark_ms Nullable(Int64) AFTER closed_before_ms,
    ADD COLUMN replay_closed_before_ms Nullable(Int64) AFTER replay_watermark_ms;
