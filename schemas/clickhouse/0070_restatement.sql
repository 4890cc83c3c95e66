-- Restating a touchpoint after an unmerge or a late identify (docs/identity.md) moves its counted contributions
-- from the role it was stored with to the role it has now: the repeat-contact indicators need the previous
-- contact it was counted with. Rows written before this column have NULL (counted as a first contact).
ALTER TABLE touchpoints ADD COLUMN previous_contact_ms Nullable(UInt64) AFTER purchase_count;
