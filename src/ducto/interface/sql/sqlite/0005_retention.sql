-- Bounded growth: when each idempotency record was written (for its retention and `prune`),
-- an index to find finished holds past their retention, the daily rollups of archived usage,
-- and the ids of archived ledger rows. The archive horizon lives in settings
-- ('archived_before', microseconds), written by the first archive.

ALTER TABLE idempotency ADD COLUMN created_us INTEGER NOT NULL DEFAULT 0;
-- Keys written before this version get a full retention, counted from the upgrade (to the
-- second), rather than expiring all at once.
UPDATE idempotency SET created_us = CAST(strftime('%s', 'now') AS INTEGER) * 1000000;
CREATE INDEX idempotency_created ON idempotency (created_us);

-- Only holds nothing counts any more are pruned; a counted hold is never in this index.
CREATE INDEX holds_prune ON holds (expires_us) WHERE counted = 0;

-- Net paid usage and row count of archived rows per UTC day (proleptic ordinal), user, model.
CREATE TABLE rollups (
    day INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    model TEXT NOT NULL,
    net INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, user_id, model)
) WITHOUT ROWID;

-- Ledger rows moved out by `archive_ledger`, so a refund of one is told so.
CREATE TABLE archived_rows (
    id TEXT PRIMARY KEY
) WITHOUT ROWID;

-- Closed spend windows are found by window, not by user: without this a prune chunk would
-- read the open windows of every user to find the closed ones.
CREATE INDEX spend_period ON spend (cap_type, period);
