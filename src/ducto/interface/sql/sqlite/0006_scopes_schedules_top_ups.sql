-- Scheduled pricing versions, budget scopes on holds, usage, caps and spend windows, and auto
-- top-up claims with their monthly totals. A budget scope is '' where there is none, as a model
-- is '' for every model, so it can be part of a primary key.

-- When a version takes effect (its publication unless it was scheduled) and when a scheduled
-- one was cancelled. The version in force is the later of the pointer (settings
-- 'active_pricing' and 'active_pricing_at', microseconds: the last publication or activation
-- and when it was made) and the scheduled versions whose time has come.
ALTER TABLE pricing ADD COLUMN effective_us INTEGER NOT NULL DEFAULT 0;
ALTER TABLE pricing ADD COLUMN cancelled_us INTEGER;
-- Every version published so far took effect when it was published.
UPDATE pricing SET effective_us = created_us;
-- The active version stays in force: the pointer is dated no earlier than any version, so none
-- of them counts as scheduled after it.
INSERT INTO settings (key, value)
    SELECT 'active_pricing_at', CAST((SELECT max(created_us) FROM pricing) AS TEXT)
    WHERE EXISTS (SELECT 1 FROM settings WHERE key = 'active_pricing')
    AND EXISTS (SELECT 1 FROM pricing);
-- The versions still to take effect after the pointer.
CREATE INDEX pricing_scheduled ON pricing (effective_us) WHERE cancelled_us IS NULL;

ALTER TABLE holds ADD COLUMN scope TEXT;
ALTER TABLE ledger ADD COLUMN scope TEXT;

-- Counted holds by model ('' for every model) and scope ('' for none); the row for every model
-- and no scope is never written (that total is accounts.reserved).
CREATE TABLE reserved_by_model_new (
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    model TEXT NOT NULL,
    scope TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (kind, account, model, scope)
) WITHOUT ROWID;
INSERT INTO reserved_by_model_new (kind, account, model, scope, amount)
    SELECT kind, account, model, '', amount FROM reserved_by_model;
DROP TABLE reserved_by_model;
ALTER TABLE reserved_by_model_new RENAME TO reserved_by_model;

-- Net paid usage per user, window, model ('' is every model) and scope ('' is every scope).
CREATE TABLE spend_new (
    user_id TEXT NOT NULL,
    cap_type TEXT NOT NULL,
    period INTEGER NOT NULL,
    model TEXT NOT NULL,
    scope TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (user_id, cap_type, period, model, scope)
) WITHOUT ROWID;
INSERT INTO spend_new (user_id, cap_type, period, model, scope, amount)
    SELECT user_id, cap_type, period, model, '', amount FROM spend;
DROP TABLE spend;
ALTER TABLE spend_new RENAME TO spend;
CREATE INDEX spend_period ON spend (cap_type, period);

-- A cap per user, type, model ('' is every model) and scope ('' is all of the user's usage).
CREATE TABLE caps_new (
    user_id TEXT NOT NULL,
    cap_type TEXT NOT NULL,
    model TEXT NOT NULL,
    scope TEXT NOT NULL,
    cap_limit INTEGER NOT NULL,
    action TEXT NOT NULL,
    PRIMARY KEY (user_id, cap_type, model, scope)
) WITHOUT ROWID;
INSERT INTO caps_new (user_id, cap_type, model, scope, cap_limit, action)
    SELECT user_id, cap_type, model, '', cap_limit, action FROM caps;
DROP TABLE caps;
ALTER TABLE caps_new RENAME TO caps;

-- Archived usage per UTC day, user, model and scope ('' for none).
CREATE TABLE rollups_new (
    day INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    model TEXT NOT NULL,
    scope TEXT NOT NULL,
    net INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, user_id, model, scope)
) WITHOUT ROWID;
INSERT INTO rollups_new (day, user_id, model, scope, net, count)
    SELECT day, user_id, model, '', net, count FROM rollups;
DROP TABLE rollups;
ALTER TABLE rollups_new RENAME TO rollups;

-- An account's one in-flight top-up.
CREATE TABLE top_up_claims (
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    id TEXT NOT NULL,
    amount INTEGER NOT NULL,
    month INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    PRIMARY KEY (kind, account)
) WITHOUT ROWID;

-- Top-ups counted toward an account per UTC month: a window counter, keyed by month first so
-- `prune` finds closed months without reading every account's.
CREATE TABLE top_up_totals (
    month INTEGER NOT NULL,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (month, kind, account)
) WITHOUT ROWID;
