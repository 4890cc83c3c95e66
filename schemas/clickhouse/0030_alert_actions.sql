-- What operators did about an alert in the console: acknowledge, silence (until a time) or resolve. One row per
-- action; an alert's state is its newest action (argMax by at_ms), so nothing is ever updated in place. The
-- alert lifecycle engine may replace this with its own tables; the console reads it through one interface.
CREATE TABLE IF NOT EXISTS alert_actions
(
    alert_id String,
    rule String,
    tenant String,
    channel String,
    action Enum8('acknowledge' = 1, 'silence' = 2, 'resolve' = 3),
    actor String,
    note String,
    silenced_until_ms UInt64,
    at_ms UInt64,
    at DateTime('UTC') DEFAULT toDateTime(intDiv(at_ms, 1000), 'UTC')
)
ENGINE = ReplacingMergeTree(at_ms)
ORDER BY (alert_id, at_ms, action);
