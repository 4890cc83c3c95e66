-- Indicator partials per closed event-time window, one row per (window, tenant, channel, indicator, source
-- partition). A window is emitted once, when the partition's watermark passes its end; a replay after a crash
-- writes the same row again and ReplacingMergeTree keeps one. Sum numerator and denominator across partitions.
CREATE TABLE IF NOT EXISTS indicator_windows
(
    window_start DateTime('UTC'),
    window_end DateTime('UTC'),
    tenant String,
    channel Enum8('WEB' = 1, 'MOBILE_APP' = 2, 'CONTACT_CENTRE' = 3, 'CHATBOT' = 4, 'EMAIL' = 5, 'SOCIAL' = 6,
                  'HELPDESK' = 7, 'SURVEY' = 8, 'STORE' = 9, 'BILLING' = 10),
    indicator String,
    family Enum8('CX' = 1, 'CS' = 2, 'UX' = 3),
    source_partition UInt16,
    numerator Float64,
    denominator Float64,
    emitted_at_ms UInt64
)
ENGINE = ReplacingMergeTree(emitted_at_ms)
PARTITION BY toYYYYMM(window_start)
ORDER BY (indicator, tenant, channel, window_start, source_partition);

-- One row per window, tenant, channel and indicator, with its value: what dashboards and BI read.
-- (Inner names differ from the columns: ClickHouse 18.16 reads `sum(x) AS x` as an aggregate inside itself.)
CREATE VIEW IF NOT EXISTS indicator_values AS
SELECT
    window_start,
    window_end,
    tenant,
    channel,
    indicator,
    family,
    num AS numerator,
    den AS denominator,
    if(den > 0, num / den, NULL) AS value
FROM
(
    SELECT
        window_start,
        any(window_end) AS window_end,
        tenant,
        channel,
        indicator,
        any(family) AS family,
        sum(numerator) AS num,
        sum(denominator) AS den
    FROM indicator_windows FINAL
    GROUP BY window_start, tenant, channel, indicator
);
