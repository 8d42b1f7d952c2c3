-- Plans and allowance, spend caps and their windows, teams, pricing versions.

ALTER TABLE accounts ADD COLUMN plan_id TEXT;
ALTER TABLE accounts ADD COLUMN name TEXT;
-- How many spend caps the user has, so the common case skips looking for them.
ALTER TABLE accounts ADD COLUMN caps INTEGER NOT NULL DEFAULT 0;

CREATE TABLE allowance_used (
    user_id TEXT NOT NULL,
    month INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (user_id, month)
) WITHOUT ROWID;

-- Net paid usage per user, window and model ('' is every model).
CREATE TABLE spend (
    user_id TEXT NOT NULL,
    cap_type TEXT NOT NULL,
    period INTEGER NOT NULL,
    model TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (user_id, cap_type, period, model)
) WITHOUT ROWID;

CREATE TABLE caps (
    user_id TEXT NOT NULL,
    cap_type TEXT NOT NULL,
    model TEXT NOT NULL,
    cap_limit INTEGER NOT NULL,
    action TEXT NOT NULL,
    PRIMARY KEY (user_id, cap_type, model)
) WITHOUT ROWID;

CREATE TABLE team_members (
    team_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    spend_cap INTEGER,
    PRIMARY KEY (team_id, user_id)
) WITHOUT ROWID;

CREATE TABLE member_spend (
    team_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    month INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (team_id, user_id, month)
) WITHOUT ROWID;

CREATE TABLE pricing (
    version INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    label TEXT,
    created_us INTEGER NOT NULL
);

CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
