-- Accounts, lots, holds, the ledger, idempotency keys, plans, caps, teams and pricing.
-- Credits are BIGINT; instants are timestamptz. Every table lives in the store's schema.

CREATE TABLE accounts (
    kind text NOT NULL CHECK (kind IN ('u', 't')),
    id text NOT NULL,
    balance bigint NOT NULL DEFAULT 0,
    lifetime_purchased bigint NOT NULL DEFAULT 0,
    reserved bigint NOT NULL DEFAULT 0,
    expired_unswept bigint NOT NULL DEFAULT 0,
    plan_id text,
    name text,
    caps integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (kind, id)
);

CREATE TABLE lots (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    kind text NOT NULL,
    account text NOT NULL,
    remaining bigint NOT NULL CHECK (remaining >= 0),
    expires_at timestamptz,
    expired boolean NOT NULL DEFAULT false
);
-- Burn-down order: soonest-expiring first, non-expiring last, oldest first among equals.
CREATE INDEX lots_live ON lots (kind, account, (coalesce(expires_at, 'infinity')), seq)
    WHERE remaining > 0 AND NOT expired;
CREATE INDEX lots_expired ON lots (kind, account, expires_at, seq)
    WHERE remaining > 0 AND expired;
CREATE INDEX lots_sweep ON lots (expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;

CREATE TABLE holds (
    id text PRIMARY KEY,
    kind text NOT NULL,
    account text NOT NULL,
    amount bigint NOT NULL,
    operation_type text NOT NULL,
    model text,
    use_allowance boolean NOT NULL,
    expires_at timestamptz NOT NULL,
    state smallint NOT NULL DEFAULT 0,
    counted boolean NOT NULL DEFAULT true
);
CREATE INDEX holds_counted ON holds (kind, account, expires_at) WHERE counted;

CREATE TABLE reserved_by_model (
    kind text NOT NULL,
    account text NOT NULL,
    model text NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (kind, account, model)
);

CREATE TABLE ledger (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    kind text NOT NULL,
    account text NOT NULL,
    amount bigint NOT NULL,
    type text NOT NULL,
    balance_after bigint NOT NULL,
    metadata jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    reservation_id text,
    idempotency_key text,
    draws jsonb,
    refunded bigint NOT NULL DEFAULT 0,
    draw_refunds jsonb,
    spender text,
    model text,
    operation_type text,
    allowance bigint NOT NULL DEFAULT 0
);
CREATE INDEX ledger_account ON ledger (kind, account, seq);
CREATE INDEX ledger_usage ON ledger (created_at) WHERE type IN ('usage', 'team_usage');

CREATE TABLE idempotency (
    kind text NOT NULL,
    account text NOT NULL,
    op text NOT NULL,
    key text NOT NULL,
    fingerprint text NOT NULL,
    result text NOT NULL,
    PRIMARY KEY (kind, account, key, op)
);

CREATE TABLE allowance_used (
    user_id text NOT NULL,
    month integer NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (user_id, month)
);

-- Net paid usage per user, window and model ('' is every model).
CREATE TABLE spend (
    user_id text NOT NULL,
    cap_type text NOT NULL,
    period integer NOT NULL,
    model text NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (user_id, cap_type, period, model)
);

CREATE TABLE caps (
    user_id text NOT NULL,
    cap_type text NOT NULL,
    model text NOT NULL,
    cap_limit bigint NOT NULL,
    action text NOT NULL,
    PRIMARY KEY (user_id, cap_type, model)
);

CREATE TABLE team_members (
    team_id text NOT NULL,
    user_id text NOT NULL,
    role text NOT NULL,
    spend_cap bigint,
    PRIMARY KEY (team_id, user_id)
);

CREATE TABLE member_spend (
    team_id text NOT NULL,
    user_id text NOT NULL,
    month integer NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (team_id, user_id, month)
);

CREATE TABLE pricing (
    version integer PRIMARY KEY,
    id text NOT NULL UNIQUE,
    config text NOT NULL,
    label text,
    created_at timestamptz NOT NULL
);

-- 'pricing': the active version ('' before any); its row is locked to number versions.
CREATE TABLE settings (
    key text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO settings (key, value) VALUES ('pricing', '');
