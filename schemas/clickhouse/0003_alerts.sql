-- Alerts raised when a closed window breaks a rule. alert_id is rule/tenant/channel/window start, so a replay
-- rewrites the same alert rather than adding a second one.
CREATE TABLE IF NOT EXISTS alerts
(
    alert_id String,
    fired_at DateTime('UTC') DEFAULT now(),
    rule String,
    indicator String,
    family Enum8('CX' = 1, 'CS' = 2, 'UX' = 3),
    severity Enum8('info' = 1, 'warning' = 2, 'critical' = 3),
    tenant String,
    channel Enum8('WEB' = 1, 'MOBILE_APP' = 2, 'CONTACT_CENTRE' = 3, 'CHATBOT' = 4, 'EMAIL' = 5, 'SOCIAL' = 6,
                  'HELPDESK' = 7, 'SURVEY' = 8, 'STORE' = 9, 'BILLING' = 10),
    window_start DateTime('UTC'),
    window_end DateTime('UTC'),
    value Float64,
    threshold Float64,
    comparison Enum8('above' = 1, 'below' = 2),
    numerator Float64,
    denominator Float64,
    message String,
    fired_at_ms UInt64
)
ENGINE = ReplacingMergeTree(fired_at_ms)
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant, window_start, rule, channel, alert_id);
