-- Indicator cells: one row per closed window, dimension combination, indicator and source partition.
-- window_kind is '1m' (tumbling pane), '15m' (hopping: 15 panes, every pane) or 'session' (per-person sessions,
-- channel 'ALL'). A cell holds mergeable state: count (weight, the denominator), total (sum, the numerator) and,
-- for quantile indicators, a log-bucketed sketch as parallel arrays (sketch_keys ascending, sketch_counts);
-- quantile is the q of a quantile indicator (0 otherwise), written from the registry so SQL can read values.
-- A cell is emitted once, when its partition's watermark passes the window end; a replay after a crash writes the
-- same cell again under the same key and ReplacingMergeTree keeps one: read it FINAL (or through the views).
CREATE TABLE IF NOT EXISTS indicator_cells
(
    window_kind String,
    window_start DateTime('UTC'),
    window_end DateTime('UTC'),
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
    emitted_at_ms UInt64
)
ENGINE = ReplacingMergeTree(emitted_at_ms)
PARTITION BY toYYYYMM(window_start)
-- Time first: alerts, pane restore, rollups and BI all read a range of window starts (of one kind).
ORDER BY (window_kind, window_start, source_partition, tenant, channel, indicator, role, flow, device_class,
          window_end);

-- Windows written before cells existed become '1m' cells without role/flow/device (same key on a rerun, so a
-- half-applied migration that runs again replaces its copies instead of adding to them).
INSERT INTO indicator_cells (window_kind, window_start, window_end, tenant, channel, role, flow, device_class,
                             indicator, family, quantile, source_partition, count, total, sketch_keys,
                             sketch_counts, emitted_at_ms)
SELECT '1m', window_start, window_end, tenant, toString(channel), '', '', '', indicator, family, 0,
       source_partition, denominator, numerator, [], [], emitted_at_ms
FROM indicator_windows FINAL;

-- The view of 0002 read indicator_windows; it is recreated below over the cells (DROP TABLE also drops views on
-- ClickHouse 18.16, which has no DROP VIEW).
DROP TABLE IF EXISTS indicator_values;

-- One row per window, tenant, channel, role, flow, device class and indicator, the partitions merged: what
-- dashboards and BI read. value = total / count, or for a quantile indicator the sketch quantile: the sketches
-- are merged by adding counts per key (sumMap), then the first key whose cumulative count exceeds the rank
-- floor(q * (n - 1)) gives 2 * GAMMA^k / (GAMMA + 1), GAMMA = 1.01 / 0.99 (0 for the zero key -2147483647).
-- numerator/denominator repeat total/count for readers of the earlier view. (Inner names differ from the
-- columns: ClickHouse 18.16 reads `sum(x) AS x` as an aggregate inside itself.)
CREATE VIEW IF NOT EXISTS indicator_values AS
SELECT
    window_kind,
    window_start,
    window_end,
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
    tot AS numerator,
    cnt AS denominator,
    if(q > 0,
       if(n > 0, if(k = -2147483647, 0., 2 * pow(1.01 / 0.99, k) / (1.01 / 0.99 + 1)), NULL),
       if(cnt > 0, tot / cnt, NULL)) AS value
FROM
(
    SELECT
        window_kind, window_start, window_end, tenant, channel, role, flow, device_class, indicator, family, q,
        cnt, tot, n,
        if(n > 0, keys[arrayFirstIndex(c -> c > toUInt64(floor(q * (n - 1))), arrayCumSum(counts))], 0) AS k
    FROM
    (
        SELECT
            window_kind, window_start, window_end, tenant, channel, role, flow, device_class, indicator, family, q,
            cnt, tot, merged.1 AS keys, merged.2 AS counts, arraySum(counts) AS n
        FROM
        (
            SELECT
                window_kind, window_start, window_end, tenant, channel, role, flow, device_class, indicator,
                any(family) AS family,
                max(quantile) AS q,
                sum(count) AS cnt,
                sum(total) AS tot,
                sumMap(sketch_keys, sketch_counts) AS merged
            FROM indicator_cells FINAL
            GROUP BY window_kind, window_start, window_end, tenant, channel, role, flow, device_class, indicator
        )
    )
);

-- The same per window, tenant, channel and indicator, summed over role, flow and device class: what the live view
-- and the alert rules judge.
CREATE VIEW IF NOT EXISTS indicator_values_by_channel AS
SELECT
    window_kind,
    window_start,
    window_end,
    tenant,
    channel,
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
        window_kind, window_start, window_end, tenant, channel, indicator, family, q, cnt, tot, n,
        if(n > 0, keys[arrayFirstIndex(c -> c > toUInt64(floor(q * (n - 1))), arrayCumSum(counts))], 0) AS k
    FROM
    (
        SELECT
            window_kind, window_start, window_end, tenant, channel, indicator, family, q, cnt, tot,
            merged.1 AS keys, merged.2 AS counts, arraySum(counts) AS n
        FROM
        (
            SELECT
                window_kind, window_start, window_end, tenant, channel, indicator,
                any(family) AS family,
                max(quantile) AS q,
                sum(count) AS cnt,
                sum(total) AS tot,
                sumMap(sketch_keys, sketch_counts) AS merged
            FROM indicator_cells FINAL
            GROUP BY window_kind, window_start, window_end, tenant, channel, indicator
        )
    )
);
