-- Late identify: a person id written before a merge -> the person id it belongs to now. Rewritten for every
-- identifier whose person changes (the newest row wins), so chains of merges resolve in one lookup.
CREATE TABLE IF NOT EXISTS person_aliases
(
    alias_person_id String,
    person_id String,
    updated_at_ms UInt64
)
ENGINE = ReplacingMergeTree(updated_at_ms)
ORDER BY alias_person_id;

-- Touchpoints attributed to the person they belong to now ("touchpoints per person" stays right after a late
-- login). Indicator windows already emitted are not rewritten.
CREATE VIEW IF NOT EXISTS touchpoints_by_person AS
SELECT *, if(alias_target = '', person_id, alias_target) AS current_person_id
FROM touchpoints FINAL
ANY LEFT JOIN
(
    SELECT aid AS person_id, alias_target
    FROM
    (
        SELECT alias_person_id AS aid, argMax(person_id, updated_at_ms) AS alias_target
        FROM person_aliases
        GROUP BY alias_person_id
    )
) AS aliases USING person_id;

-- One row per person as of now: first seen, touchpoints, channels, latest role.
CREATE VIEW IF NOT EXISTS persons AS
SELECT
    current_person_id AS person_id,
    min(first_seen_ms) AS first_seen_at_ms,
    count() AS touchpoint_count,
    uniqExact(channel) AS channel_count,
    argMax(role, event_time_ms) AS latest_role,
    max(purchase_count) AS purchases,
    max(event_time_ms) AS last_seen_at_ms
FROM touchpoints_by_person
GROUP BY current_person_id;

-- Role transitions (prospect -> user -> customer -> habitual/former ...), derived from timestamped facts, so a
-- replay or a second worker writes the same rows again and they fold into one.
CREATE TABLE IF NOT EXISTS role_transitions
(
    person_id String,
    at_ms UInt64,
    at DateTime('UTC') DEFAULT toDateTime(intDiv(at_ms, 1000), 'UTC'),
    from_role String,
    to_role String,
    cause String,
    recorded_at_ms UInt64
)
ENGINE = ReplacingMergeTree(recorded_at_ms)
ORDER BY (person_id, at_ms, to_role);

-- Every merge and every refusal of the identity graph, and every erasure (which keeps only a hash).
CREATE TABLE IF NOT EXISTS identity_audit
(
    at_ms UInt64,
    action String,
    identifier_a String,
    identifier_b String,
    from_person_id String,
    into_person_id String,
    reason String,
    event_id String,
    recorded_at_ms UInt64
)
ENGINE = ReplacingMergeTree(recorded_at_ms)
ORDER BY (action, identifier_a, identifier_b, at_ms);
