-- Journeys: one row per closed journey (one person's touchpoints sharing a journey_id or within an inactivity
-- gap, across channels); keyed by the event id of its first touchpoint, so a journey rebuilt by a replay folds
-- into the same row.
CREATE TABLE IF NOT EXISTS journeys
(
    tenant String,
    person_id String,
    journey_key String,
    start_ms UInt64,
    end_ms UInt64,
    start DateTime('UTC') DEFAULT toDateTime(intDiv(start_ms, 1000), 'UTC'),
    role_start String,
    role_end String,
    channels Array(String),
    journey_ids Array(String),
    touchpoints UInt32,
    channel_switches UInt32,
    contacts UInt32,
    repeat_contacts UInt32,
    wait_ms UInt64,
    failures UInt32,
    product_failures UInt32,
    service_failures UInt32,
    intermittent UInt8,
    rage_touchpoints UInt32,
    resolved Nullable(UInt8),
    survey_kinds Array(String),
    survey_scores Array(Int16),
    ux_score Nullable(Float64),
    cx_score Nullable(Float64),
    nps_status String,
    purchases UInt32,
    first_purchase_ms UInt64,
    cancellations UInt32,
    effort Float64,
    source_partition UInt32,
    recorded_at_ms UInt64
)
ENGINE = ReplacingMergeTree(recorded_at_ms)
PARTITION BY toYYYYMM(start)
ORDER BY (tenant, person_id, journey_key);

-- Person profiles as of their last closed journey; the newest row per person wins.
CREATE TABLE IF NOT EXISTS person_profiles
(
    tenant String,
    person_id String,
    updated_ms UInt64,
    journeys UInt32,
    role String,
    role_path Array(String),
    role_since_ms Array(UInt64),
    contact_channel String,
    contact_channel_n UInt32,
    contact_hour Nullable(UInt8),
    contact_hour_n UInt32,
    contact_n UInt32,
    last_touch_ms UInt64,
    last_touch_channel String,
    last_touch_event_type String,
    last_touch_ok Nullable(UInt8),
    last_journey_effort Float64,
    last_journey_ux Nullable(Float64),
    last_journey_cx Nullable(Float64),
    pre_purchase_ux Nullable(Float64),
    pre_purchase_ux_n UInt32,
    pre_purchase_cx Nullable(Float64),
    pre_purchase_cx_n UInt32,
    post_purchase_ux Nullable(Float64),
    post_purchase_ux_n UInt32,
    post_purchase_cx Nullable(Float64),
    post_purchase_cx_n UInt32,
    nps_score Nullable(Int16),
    nps_status String,
    nps_at_ms Nullable(UInt64),
    no_result_searches Array(String),
    source_partition UInt32,
    recorded_at_ms UInt64
)
ENGINE = ReplacingMergeTree(updated_ms)
ORDER BY (tenant, person_id);

-- Journeys attributed to the person they belong to now (a user who bought got a new person id).
CREATE VIEW IF NOT EXISTS journeys_by_person AS
SELECT *, if(alias_target = '', person_id, alias_target) AS current_person_id
FROM journeys FINAL
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

-- Conversion by UX, per tenant and day: persons who were prospects or users in journeys that day, split by the
-- UX of those journeys ('failures': a failed task, app error or crash, or intermittency; else 'clean'), and how
-- many of them bought within 30 days of their first journey that day.
CREATE VIEW IF NOT EXISTS conversion_by_ux AS
SELECT tenant, day, ux, count() AS users, sum(converted) AS converted, converted / users AS conversion_rate
FROM
(
    SELECT tenant, current_person_id, day, ux,
           purchased_ms >= first_ms AND purchased_ms < first_ms + 30 * 86400000 AS converted
    FROM
    (
        SELECT tenant, current_person_id, toDate(start) AS day, min(start_ms) AS first_ms,
               if(sum(product_failures) + sum(intermittent) > 0, 'failures', 'clean') AS ux
        FROM journeys_by_person
        WHERE role_start IN ('prospect', 'user') AND (ux_score IS NOT NULL OR product_failures > 0)
        GROUP BY tenant, current_person_id, day
    ) AS seen
    ANY LEFT JOIN
    (
        SELECT tenant, current_person_id, min(first_purchase_ms) AS purchased_ms
        FROM journeys_by_person
        WHERE purchases > 0
        GROUP BY tenant, current_person_id
    ) AS bought USING (tenant, current_person_id)
)
GROUP BY tenant, day, ux;

-- Churn by service experience, per tenant and day: customers with contacts or survey answers in journeys that
-- day, split by the service in them ('bad': a detractor score, an unresolved contact or a repeat contact; else
-- 'good'), and how many of them cancelled or became former customers within 30 days from their first journey that
-- day (in the same journey or a later one).
CREATE VIEW IF NOT EXISTS churn_by_service AS
SELECT tenant, day, service, count() AS customers, sum(churned) AS churned, churned / customers AS churn_rate
FROM
(
    SELECT tenant, current_person_id, day, service,
           left_ms >= first_ms AND left_ms < first_ms + 30 * 86400000 AS churned
    FROM
    (
        SELECT tenant, current_person_id, toDate(start) AS day, min(start_ms) AS first_ms,
               if(countIf(nps_status = 'detractor' OR resolved = 0 OR repeat_contacts > 0) > 0, 'bad', 'good')
                   AS service
        FROM journeys_by_person
        WHERE role_start IN ('customer', 'habitual_customer') AND (contacts > 0 OR length(survey_kinds) > 0)
        GROUP BY tenant, current_person_id, day
    ) AS served
    ANY LEFT JOIN
    (
        SELECT tenant, current_person_id, min(end_ms) AS left_ms
        FROM journeys_by_person
        WHERE cancellations > 0 OR role_end = 'former_customer'
        GROUP BY tenant, current_person_id
    ) AS gone USING (tenant, current_person_id)
)
GROUP BY tenant, day, service;

-- Promoters among customers and among users, per tenant and day, from the latest NPS of each journey.
CREATE VIEW IF NOT EXISTS promoters_by_role AS
SELECT tenant, toDate(start) AS day,
       if(role_end IN ('customer', 'habitual_customer'), 'customers', 'users') AS segment,
       count() AS answered,
       countIf(nps_status = 'promoter') AS promoters,
       countIf(nps_status = 'detractor') AS detractors,
       promoters / answered AS promoter_share,
       100 * (promoters - detractors) / answered AS nps
FROM journeys_by_person
WHERE nps_status != ''
GROUP BY tenant, day, segment;
