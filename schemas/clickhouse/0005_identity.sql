-- Identity enrichment on every touchpoint: the person as resolved when the row was written, their role as of
-- the event's time, and the identifiers it was resolved from. (ADD COLUMN has no IF NOT EXISTS on 18.16: the
-- migration runner skips a column that is already there.)
ALTER TABLE touchpoints MODIFY COLUMN role Enum8('visitor' = 1, 'user' = 2, 'customer' = 3, 'prospect' = 4,
                                                 'habitual_customer' = 5, 'former_customer' = 6);
ALTER TABLE touchpoints ADD COLUMN is_customer UInt8 DEFAULT 0 AFTER role;
ALTER TABLE touchpoints ADD COLUMN is_user UInt8 DEFAULT 0 AFTER is_customer;
ALTER TABLE touchpoints ADD COLUMN first_seen_ms UInt64 DEFAULT event_time_ms AFTER is_user;
ALTER TABLE touchpoints ADD COLUMN customer_since_ms Nullable(UInt64) AFTER first_seen_ms;
ALTER TABLE touchpoints ADD COLUMN purchase_count UInt32 DEFAULT 0 AFTER customer_since_ms;
ALTER TABLE touchpoints ADD COLUMN resolved_from Array(String) AFTER purchase_count;
ALTER TABLE touchpoints ADD COLUMN email_sha256 Nullable(String) AFTER customer_id;
ALTER TABLE touchpoints ADD COLUMN phone_sha256 Nullable(String) AFTER email_sha256;
ALTER TABLE touchpoints ADD COLUMN helpdesk_requester_id Nullable(String) AFTER phone_sha256;
