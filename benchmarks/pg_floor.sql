-- The floor PostgresStore is measured against: a reserve and a deduct as one PL/pgSQL call each
-- (one round trip per operation), with the same durability and the same essential work: lock the
-- account, check what is spendable, record the hold; then settle it, debit the balance and append
-- a ledger row. No idempotency keys, caps, lots or allowance: the least a correct pair can do.

CREATE TABLE floor_accounts (
    id text PRIMARY KEY,
    balance bigint NOT NULL DEFAULT 0,
    reserved bigint NOT NULL DEFAULT 0
);

CREATE TABLE floor_holds (
    id bigserial PRIMARY KEY,
    account text NOT NULL,
    amount bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    state smallint NOT NULL DEFAULT 0
);

CREATE TABLE floor_ledger (
    seq bigserial PRIMARY KEY,
    account text NOT NULL,
    amount bigint NOT NULL,
    balance_after bigint NOT NULL,
    reservation_id bigint,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION floor_reserve(p_account text, p_amount bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    acct floor_accounts%ROWTYPE;
    hold_id bigint;
BEGIN
    SELECT * INTO acct FROM floor_accounts WHERE id = p_account FOR UPDATE;
    IF acct.balance - acct.reserved < p_amount THEN
        RETURN NULL;
    END IF;
    INSERT INTO floor_holds (account, amount, expires_at)
        VALUES (p_account, p_amount, clock_timestamp() + interval '600 seconds')
        RETURNING id INTO hold_id;
    UPDATE floor_accounts SET reserved = reserved + p_amount WHERE id = p_account;
    RETURN hold_id;
END;
$$;

CREATE FUNCTION floor_deduct(p_account text, p_hold bigint, p_amount bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    held bigint;
    after bigint;
BEGIN
    PERFORM 1 FROM floor_accounts WHERE id = p_account FOR UPDATE;
    UPDATE floor_holds SET state = 1 WHERE id = p_hold AND account = p_account AND state = 0
        RETURNING amount INTO held;
    IF held IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE floor_accounts SET balance = balance - p_amount, reserved = reserved - held
        WHERE id = p_account RETURNING balance INTO after;
    INSERT INTO floor_ledger (account, amount, balance_after, reservation_id)
        VALUES (p_account, -p_amount, after, p_hold);
    RETURN after;
END;
$$;
