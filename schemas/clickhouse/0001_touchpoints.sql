-- Every valid touchpoint, enriched with the person and role it was resolved to.
-- Written by the workers at least once; ReplacingMergeTree folds replays and duplicates (same event_id, same
-- event time) into one row, preferring the copy that was counted in indicator windows. Exact counts: use FINAL
-- or the touchpoints_unique view.
CREATE TABLE IF NOT EXISTS touchpoints
(
    event_id String,
    event_time_ms UInt64,
    event_time DateTime('UTC') DEFAULT toDateTime(intDiv(event_time_ms, 1000), 'UTC'),
    tenant String,
    channel Enum8('WEB' = 1, 'MOBILE_APP' = 2, 'CONTACT_CENTRE' = 3, 'CHATBOT' = 4, 'EMAIL' = 5, 'SOCIAL' = 6,
                  'HELPDESK' = 7, 'SURVEY' = 8, 'STORE' = 9, 'BILLING' = 10),
    event_type String,
    person_id String,
    role Enum8('visitor' = 1, 'user' = 2, 'customer' = 3),
    anonymous_id Nullable(String),
    user_id Nullable(String),
    customer_id Nullable(String),
    session_id Nullable(String),
    journey_id Nullable(String),
    flow Nullable(String),
    device_class Nullable(String),
    outcome Nullable(String),
    error_code Nullable(String),
    duration_ms Nullable(Int64),
    survey_kind Nullable(String),
    survey_score Nullable(Int16),
    survey_scale_min Nullable(Int16),
    survey_scale_max Nullable(Int16),
    survey_about_channel Nullable(String),
    queue_ms Nullable(Int64),
    handle_ms Nullable(Int64),
    first_response_ms Nullable(Int64),
    resolved Nullable(UInt8),
    escalated Nullable(UInt8),
    agent_id Nullable(String),
    lcp_ms Nullable(Float64),
    inp_ms Nullable(Float64),
    cls Nullable(Float64),
    amount_minor Nullable(Int64),
    currency Nullable(String),
    sentiment Nullable(Float64),
    app_version Nullable(String),
    rage_clicks Nullable(Int32),
    attribute_keys Array(String),
    attribute_values Array(String),
    schema_id UInt32,
    source_partition UInt16,
    source_offset UInt64,
    counted UInt8,
    ingested_at DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(counted)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, channel, event_time, event_id);

CREATE VIEW IF NOT EXISTS touchpoints_unique AS
SELECT * FROM touchpoints FINAL;
