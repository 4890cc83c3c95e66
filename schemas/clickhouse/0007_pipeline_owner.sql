-- The pipeline (consumer group and topic) whose indicator cells, rollups and checkpoints this database holds.
-- Cells and rollups are keyed by source partition, so two pipelines writing to one database would replace each
-- other's cells: `touchpoint init` and every worker claim the database and refuse one claimed by another.
CREATE TABLE IF NOT EXISTS pipeline_owner
(
    consumer_group String,
    topic String,
    claimed_at_ms UInt64
)
ENGINE = MergeTree
ORDER BY claimed_at_ms;
