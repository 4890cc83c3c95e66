-- The alerter (`touchpoint alerter`, docs/alerting.md): one engine for the whole cluster writes these tables.

-- Every transition of every alert series (inactive -> pending -> firing -> resolved, no_data), with the window and
-- values that caused it and how complete the window was. Append-only; event_id is deterministic, so an alerter
-- that takes over and judges a window again writes the same key and FINAL keeps one.
CREATE TABLE IF NOT EXISTS alert_events
(
    event_id String,
    fingerprint String,
    rule String,
    rule_kind String,
    severity String,
    family String,
    tenant String,
    channel String,
    label_names Array(String),
    label_values Array(String),
    from_state String,
    to_state String,
    cause String,
    actor String,
    window_kind String,
    window_start DateTime('UTC'),
    window_end DateTime('UTC'),
    window_start_ms UInt64,
    window_end_ms UInt64,
    value Nullable(Float64),
    threshold Float64,
    value_names Array(String),
    value_numbers Array(Float64),
    message String,
    partitions UInt16,
    closed_by_watermark Array(UInt16),
    closed_by_idle Array(UInt16),
    channels_reporting Array(String),
    channels_expected Array(String),
    active_since_ms UInt64,
    at_ms UInt64,
    at DateTime('UTC') DEFAULT toDateTime(intDiv(at_ms, 1000), 'UTC'),
    epoch UInt64
)
ENGINE = ReplacingMergeTree(at_ms)
PARTITION BY toYYYYMM(window_end)
ORDER BY (fingerprint, window_end_ms, event_id);

-- The lifecycle state of each series as the alerter keeps it (series_json restores it at takeover), plus one
-- progress row (fingerprint '') saying which windows are judged; written in one insert per cycle, so the
-- progress never runs ahead of the states. The highest version wins.
CREATE TABLE IF NOT EXISTS alert_state
(
    fingerprint String,
    rule String,
    tenant String,
    channel String,
    state String,
    since_ms UInt64,
    value Nullable(Float64),
    acked_by String,
    escalation_level UInt8,
    window_end_ms UInt64,
    series_json String,
    version UInt64,
    epoch UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY fingerprint;

-- Current state per alert.
CREATE VIEW IF NOT EXISTS alert_current AS
SELECT fingerprint, rule, tenant, channel, state, since_ms, value, acked_by, escalation_level, window_end_ms
FROM alert_state FINAL
WHERE fingerprint != '';

-- Delivery log: a notification is planned ('pending'), then each attempt is logged ('sent', 'failed'), or it is
-- 'silenced' or 'abandoned'. The latest row per notification and receiver is its status.
CREATE TABLE IF NOT EXISTS alert_notifications
(
    notification_id String,
    receiver String,
    group_key String,
    reason String,
    status String,
    attempt UInt32,
    http_status UInt16,
    error String,
    event_ids Array(String),
    payload String,
    at_ms UInt64,
    epoch UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(toDateTime(intDiv(at_ms, 1000), 'UTC'))
ORDER BY (notification_id, receiver, at_ms);

-- Silences mute notifications of alerts whose labels equal every matcher, from starts to ends (an expired or
-- cancelled silence gets a newer row with an earlier end).
CREATE TABLE IF NOT EXISTS silences
(
    silence_id String,
    matcher_names Array(String),
    matcher_values Array(String),
    starts_at_ms UInt64,
    ends_at_ms UInt64,
    created_by String,
    comment String,
    updated_at_ms UInt64
)
ENGINE = ReplacingMergeTree(updated_at_ms)
ORDER BY silence_id;

-- What operators asked for (ack, resolve, close_case); the active alerter applies them in its next cycle.
CREATE TABLE IF NOT EXISTS alert_commands
(
    command_id String,
    action String,
    target String,
    actor String,
    comment String,
    at_ms UInt64
)
ENGINE = ReplacingMergeTree(at_ms)
ORDER BY (command_id);

CREATE VIEW IF NOT EXISTS alert_acknowledgements AS
SELECT target AS fingerprint, actor, comment, at_ms FROM alert_commands FINAL WHERE action = 'ack';

-- Follow-up cases of detractor customers: one row per case, the newest version wins (read FINAL).
CREATE TABLE IF NOT EXISTS cases
(
    case_id String,
    tenant String,
    person_id String,
    reason String,
    queue String,
    status String,
    opened_at_ms UInt64,
    sla_due_ms UInt64,
    source_event_id String,
    source_channel String,
    score Nullable(Float64),
    escalation_level UInt8,
    closed_at_ms UInt64,
    closed_by String,
    updated_at_ms UInt64
)
ENGINE = ReplacingMergeTree(updated_at_ms)
ORDER BY case_id;

CREATE TABLE IF NOT EXISTS case_history
(
    case_id String,
    at_ms UInt64,
    action String,
    status String,
    detail String,
    actor String
)
ENGINE = ReplacingMergeTree(at_ms)
ORDER BY (case_id, action, at_ms);

-- Which alerter is active: a claim per (epoch, holder); the earliest claim of the highest epoch holds the lease
-- while it renews within the lease time. A standby claims the next epoch when the holder stops renewing.
CREATE TABLE IF NOT EXISTS alerter_lease
(
    epoch UInt64,
    holder String,
    claimed_at_ms UInt64,
    renewed_at_ms UInt64
)
ENGINE = ReplacingMergeTree(renewed_at_ms)
ORDER BY (epoch, holder);
