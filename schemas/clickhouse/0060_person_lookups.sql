-- Look-ups of one person that read a few granules instead of scanning touchpoints (ordered by tenant, channel and
-- time): the console's journey and `touchpoint forget` read these two tables, which materialized views keep current
-- on every insert into touchpoints. Erasure deletes from them as from touchpoints (a DELETE on touchpoints does not
-- reach a materialized view). Channel and role are strings, so a value added to touchpoints' enums later cannot
-- make an insert fail here.

-- A person's touchpoints: the columns of a journey, first seen, purchases and the identifiers they came from.
-- Replays and duplicates fold as in touchpoints (same person, time and event id; the counted copy wins).
CREATE TABLE IF NOT EXISTS person_touchpoints
(
    person_id String,
    event_time_ms UInt64,
    event_id String,
    event_time DateTime('UTC'),
    tenant String,
    channel String,
    event_type String,
    role String,
    flow Nullable(String),
    outcome Nullable(String),
    error_code Nullable(String),
    survey_kind Nullable(String),
    survey_score Nullable(Int16),
    amount_minor Nullable(Int64),
    currency Nullable(String),
    first_seen_ms UInt64,
    purchase_count UInt32,
    resolved_from Array(String),
    counted UInt8
)
ENGINE = ReplacingMergeTree(counted)
PARTITION BY toYYYYMM(event_time)
ORDER BY (person_id, event_time_ms, event_id);

-- Identifier -> the person ids touchpoints resolved it to (one row per pair once merged; last_seen_ms the latest).
CREATE TABLE IF NOT EXISTS identifier_persons
(
    identifier String,
    person_id String,
    last_seen_ms UInt64
)
ENGINE = ReplacingMergeTree(last_seen_ms)
ORDER BY (identifier, person_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS person_touchpoints_writer TO person_touchpoints AS
SELECT person_id, event_time_ms, event_id, event_time, tenant, toString(channel) AS channel, event_type,
       toString(role) AS role, flow, outcome, error_code, survey_kind, survey_score, amount_minor, currency,
       first_seen_ms, purchase_count, resolved_from, counted
FROM touchpoints;

-- Not grouped per insert: merges fold the pairs, and grouping a flush cost more server CPU than it saved.
CREATE MATERIALIZED VIEW IF NOT EXISTS identifier_persons_writer TO identifier_persons AS
SELECT identifier, person_id, event_time_ms AS last_seen_ms
FROM touchpoints
ARRAY JOIN resolved_from AS identifier;

-- Rows written before this migration (after the views exist, so none is missed; a row copied twice folds).
INSERT INTO person_touchpoints
SELECT person_id, event_time_ms, event_id, event_time, tenant, toString(channel), event_type, toString(role), flow,
       outcome, error_code, survey_kind, survey_score, amount_minor, currency, first_seen_ms, purchase_count,
       resolved_from, counted
FROM touchpoints;

INSERT INTO identifier_persons
SELECT identifier, person_id, event_time_ms
FROM touchpoints
ARRAY JOIN resolved_from AS identifier;

-- Each person id written before a merge -> the person id it belongs to now (the newest alias row wins).
CREATE VIEW IF NOT EXISTS person_alias_targets AS
SELECT aid AS person_id, alias_target
FROM
(
    SELECT alias_person_id AS aid, argMax(person_id, updated_at_ms) AS alias_target
    FROM person_aliases
    GROUP BY alias_person_id
);
