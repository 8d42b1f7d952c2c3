-- Accounts, lots, holds, the ledger and idempotency keys.
-- Instants are INTEGER microseconds since the Unix epoch (UTC); credits are INTEGER.

CREATE TABLE accounts (
    kind TEXT NOT NULL CHECK (kind IN ('u', 't')),
    id TEXT NOT NULL,
    balance INTEGER NOT NULL DEFAULT 0,
    lifetime_purchased INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0,
    expired_unswept INTEGER NOT NULL DEFAULT 0,
    -- The earliest instant a counted hold may lapse or a live lot may expire: before it, an
    -- operation on the account need not look for either.
    hold_check_us INTEGER NOT NULL DEFAULT 9223372036854775807,
    lot_check_us INTEGER NOT NULL DEFAULT 9223372036854775807,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;

CREATE TABLE lots (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    remaining INTEGER NOT NULL CHECK (remaining >= 0),
    expires_us INTEGER,
    expired INTEGER NOT NULL DEFAULT 0
);
-- Burn-down order: soonest-expiring first, non-expiring last, oldest first among equals.
CREATE INDEX lots_live ON lots (kind, account, coalesce(expires_us, 9223372036854775807), seq)
    WHERE remaining > 0 AND expired = 0;
CREATE INDEX lots_expired ON lots (kind, account, expires_us, seq)
    WHERE remaining > 0 AND expired = 1;
CREATE INDEX lots_sweep ON lots (expires_us) WHERE remaining > 0 AND expires_us IS NOT NULL;

CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    amount INTEGER NOT NULL,
    operation_type TEXT NOT NULL,
    model TEXT,
    use_allowance INTEGER NOT NULL,
    expires_us INTEGER NOT NULL,
    state INTEGER NOT NULL DEFAULT 0,
    counted INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
CREATE INDEX holds_counted ON holds (kind, account, expires_us) WHERE counted = 1;

CREATE TABLE reserved_by_model (
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    model TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (kind, account, model)
) WITHOUT ROWID;

CREATE TABLE ledger (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    amount INTEGER NOT NULL,
    type TEXT NOT NULL,
    balance_after INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    reservation_id TEXT,
    idempotency_key TEXT,
    draws TEXT,
    refunded INTEGER NOT NULL DEFAULT 0,
    draw_refunds TEXT,
    spender TEXT,
    model TEXT,
    operation_type TEXT,
    allowance INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX ledger_account ON ledger (kind, account, seq);
CREATE INDEX ledger_usage ON ledger (created_us) WHERE type IN ('usage', 'team_usage');

CREATE TABLE idempotency (
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    op TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (kind, account, op, key)
) WITHOUT ROWID;
