-- A snapshot of the partition's open windows (sessions, open panes) as of read_offset, so a restarted worker
-- restores it and replays only the records read since (commit_offset = read_offset). '' in checkpoints written
-- before: the worker then replays from the held-back commit_offset. ClickHouse 18.16 has no ADD COLUMN IF NOT
-- EXISTS; the migration runner skips the statement when the column exists.
ALTER TABLE pipeline_checkpoints ADD COLUMN state String DEFAULT '' AFTER replay_closed_before_ms;
