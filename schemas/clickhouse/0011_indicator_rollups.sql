-- Hourly and daily rollups of the cells for BI, per source partition, of the '1m' panes and the 'session' cells
-- ('15m' hopping windows overlap, so they are never summed into a period).
-- Why tables written by INSERT ... SELECT and not materialized views: a replay after a crash inserts the same cells
-- again, and indicator_cells folds them only when parts merge, so a materialized view (which sees each insert)
-- would count a replayed window twice. Instead the worker rolls a partition's hour up from indicator_cells FINAL
-- once the partition has closed every window of it (late events never reopen a window), and a day from the
-- hourly rows once the day is closed (session cells sit in the pane their session ended in and close with it).
-- Rows are keyed by period, dimensions, indicator and source partition, so rolling a period again (a replay,
-- another worker after a rebalance) writes the same key and ReplacingMergeTree keeps the newest roll: read them
-- FINAL or through the views below.
CREATE TABLE IF NOT EXISTS indicator_rollup_hourly
(
    period_start DateTime('UTC'),
    window_kind String,
    tenant String,
    channel String,
    role String,
    flow String,
    device_class String,
    indicator String,
    family Enum8('CX' = 1, 'CS' = 2, 'UX' = 3),
    quantile Float64,
    source_partition UInt16,
    count Float64,
    total Float64,
    sketch_keys Array(Int32),
    sketch_counts Array(UInt64),
    rolled_at_ms UInt64
)
ENGINE = ReplacingMergeTree(rolled_at_ms)
PARTITION BY toYYYYMM(period_start)
ORDER BY (period_start, source_partition, window_kind, tenant, channel, indicator, role, flow, device_class);

CREATE TABLE IF NOT EXISTS indicator_rollup_daily
(
    period_start DateTime('UTC'),
    window_kind String,
    tenant String,
    channel String,
    role String,
    flow String,
    device_class String,
    indicator String,
    family Enum8('CX' = 1, 'CS' = 2, 'UX' = 3),
    quantile Float64,
    source_partition UInt16,
    count Float64,
    total Float64,
    sketch_keys Array(Int32),
    sketch_counts Array(UInt64),
    rolled_at_ms UInt64
)
ENGINE = ReplacingMergeTree(rolled_at_ms)
PARTITION BY toYYYYMM(period_start)
ORDER BY (period_start, source_partition, window_kind, tenant, channel, indicator, role, flow, device_class);

-- Values per hour and per day, the partitions merged, computed like indicator_values (ratio, mean or sketch
-- quantile; GAMMA = 1.01 / 0.99). Periods appear once every partition that had traffic in them has closed them.
CREATE VIEW IF NOT EXISTS indicator_values_hourly AS
SELECT
    period_start,
    window_kind,
    tenant,
    channel,
    role,
    flow,
    device_class,
    indicator,
    family,
    q AS quantile,
    cnt AS count,
    tot AS total,
    if(q > 0,
       if(n > 0, if(k = -2147483647, 0., 2 * pow(1.01 / 0.99, k) / (1.01 / 0.99 + 1)), NULL),
       if(cnt > 0, tot / cnt, NULL)) AS value
FROM
(
    SELECT
        period_start, window_kind, tenant, channel, role, flow, device_class, indicator, family, q, cnt, tot, n,
        if(n > 0, keys[arrayFirstIndex(c -> c > toUInt64(floor(q * (n - 1))), arrayCumSum(counts))], 0) AS k
    FROM
    (
        SELECT
            period_start, window_kind, tenant, channel, role, flow, device_class, indicator, family, q, cnt, tot,
            merged.1 AS keys, merged.2 AS counts, arraySum(counts) AS n
        FROM
        (
            SELECT
                period_start, window_kind, tenant, channel, role, flow, device_class, indicator,
                any(family) AS family,
                max(quantile) AS q,
                sum(count) AS cnt,
                sum(total) AS tot,
                sumMap(sketch_keys, sketch_counts) AS merged
            FROM indicator_rollup_hourly FINAL
            GROUP BY period_start, window_kind, tenant, channel, role, flow, device_class, indicator
        )
    )
);

CREATE VIEW IF NOT EXISTS indicator_values_daily AS
SELECT
    period_start,
    window_kind,
    tenant,
    channel,
    role,
    flow,
    device_class,
    indicator,
    family,
    q AS quantile,
    cnt AS count,
    tot AS total,
    if(q > 0,
       if(n > 0, if(k = -2147483647, 0., 2 * pow(1.01 / 0.99, k) / (1.01 / 0.99 + 1)), NULL),
       if(cnt > 0, tot / cnt, NULL)) AS value
FROM
(
    SELECT
        period_start, window_kind, tenant, channel, role, flow, device_class, indicator, family, q, cnt, tot, n,
        if(n > 0, keys[arrayFirstIndex(c -> c > toUInt64(floor(q * (n - 1))), arrayCumSum(counts))], 0) AS k
    FROM
    (
        SELECT
            period_start, window_kind, tenant, channel, role, flow, device_class, indicator, family, q, cnt, tot,
            merged.1 AS keys, merged.2 AS counts, arraySum(counts) AS n
        FROM
        (
            SELECT
                period_start, window_kind, tenant, channel, role, flow, device_class, indicator,
                any(family) AS family,
                max(quantile) AS q,
                sum(count) AS cnt,
                sum(total) AS tot,
                sumMap(sketch_keys, sketch_counts) AS merged
            FROM indicator_rollup_daily FINAL
            GROUP BY period_start, window_kind, tenant, channel, role, flow, device_class, indicator
        )
    )
);
