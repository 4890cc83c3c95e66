-- Alert rules may judge '15m' hopping windows and session indicators (channel 'ALL') besides '1m' panes.
-- Adding an Enum value is a metadata change, and running it again changes nothing.
ALTER TABLE alerts
    MODIFY COLUMN channel Enum8('WEB' = 1, 'MOBILE_APP' = 2, 'CONTACT_CENTRE' = 3, 'CHATBOT' = 4, 'EMAIL' = 5,
                                'SOCIAL' = 6, 'HELPDESK' = 7, 'SURVEY' = 8, 'STORE' = 9, 'BILLING' = 10,
                                'ALL' = 11);

-- Skipped by the migration runner when present (ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS).
ALTER TABLE alerts ADD COLUMN window_kind String DEFAULT '1m' AFTER channel;
