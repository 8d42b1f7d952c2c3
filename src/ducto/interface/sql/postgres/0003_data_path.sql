-- The data path of PostgresStore: two functions that only move data, one document each way.
--
-- ducto_read(q) locks the accounts an operation (or a batch of them) changes and returns, as
-- one JSON document, every row the operations' arguments say they may read; ducto_write(w)
-- applies the rows the engine wrote. Every rule (what a debit takes, whether a hold counts,
-- what a result says) stays in the Python engine: these functions decide nothing.
--
-- Statements inside a PL/pgSQL function each take a new snapshot, so every read below sees
-- what the previous holder of each lock committed.

CREATE FUNCTION ducto_read(q jsonb) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
    t timestamptz;
    locks jsonb := coalesce(q->'lock', '[]');
    reads jsonb := coalesce(q->'accounts', '[]');
    swept jsonb := '[]';
    extra jsonb;
    spenders jsonb;
BEGIN
    -- Accounts the batch may create, so that FOR UPDATE has a row to lock.
    IF q ? 'create' THEN
        INSERT INTO accounts (kind, id)
        SELECT x->>0, x->>1 FROM jsonb_array_elements(q->'create') x ORDER BY 1, 2
        ON CONFLICT DO NOTHING;
    END IF;
    -- A refund names a ledger row: lock its account and the spender's (created if missing).
    IF q ? 'refunds' THEN
        SELECT coalesce(jsonb_agg(DISTINCT jsonb_build_array(kind, account)), '[]'),
               coalesce(jsonb_agg(DISTINCT jsonb_build_array('u', coalesce(spender, account))),
                        '[]')
          INTO extra, spenders
          FROM ledger WHERE id IN (SELECT jsonb_array_elements_text(q->'refunds'));
        INSERT INTO accounts (kind, id)
        SELECT x->>0, x->>1 FROM jsonb_array_elements(spenders) x ORDER BY 1, 2
        ON CONFLICT DO NOTHING;
        locks := locks || extra || spenders;
        reads := reads || extra;
    END IF;
    -- A sweep learns its accounts from the lots due now.
    IF (q->>'sweep')::boolean THEN
        SELECT coalesce(jsonb_agg(DISTINCT jsonb_build_array(kind, account)), '[]') INTO swept
          FROM lots WHERE remaining > 0 AND expires_at IS NOT NULL
           AND expires_at <= coalesce((q->>'now')::timestamptz, clock_timestamp());
        IF q ? 'lock' THEN  -- a dry run only reads
            locks := locks || swept;
        END IF;
        reads := reads || swept;
    END IF;
    -- One statement locks every account, in one order (teams 't' before users 'u'), so
    -- batches in different processes never deadlock.
    IF jsonb_array_length(locks) > 0 THEN
        PERFORM 1 FROM accounts a
          WHERE (a.kind, a.id) IN (SELECT x->>0, x->>1 FROM jsonb_array_elements(locks) x)
          ORDER BY a.kind, a.id FOR UPDATE;
    END IF;
    IF (q->>'pricing_lock')::boolean THEN
        PERFORM 1 FROM settings WHERE key = 'pricing' FOR UPDATE;
    END IF;
    t := coalesce((q->>'now')::timestamptz, clock_timestamp());
    RETURN json_build_object(
        'now', t,
        -- Each account with its holds and lots due to lapse and its holds by model.
        'accounts', CASE WHEN jsonb_array_length(reads) > 0 THEN (
            SELECT json_agg(json_build_array(a.kind, a.id, a.balance, a.lifetime_purchased,
                a.reserved, a.expired_unswept, a.plan_id, a.name, a.caps,
                (SELECT json_agg(json_build_array(h.id, h.amount, h.model, h.member, h.expires_at))
                   FROM holds h WHERE h.kind = a.kind AND h.account = a.id AND h.counted
                    AND h.expires_at <= t),
                (SELECT json_agg(json_build_array(l.id, l.remaining)) FROM lots l
                  WHERE l.kind = a.kind AND l.account = a.id AND l.remaining > 0
                    AND NOT l.expired AND l.expires_at <= t),
                (SELECT json_object_agg(r.model, r.amount) FROM reserved_by_model r
                  WHERE r.kind = a.kind AND r.account = a.id)))
            FROM (SELECT DISTINCT x->>0 AS kind, x->>1 AS id FROM jsonb_array_elements(reads) x) k
            JOIN accounts a ON a.kind = k.kind AND a.id = k.id) END,
        -- Caps, this window's spend and this month's allowance used, per user.
        'users', CASE WHEN q ? 'users' THEN (
            SELECT json_agg(json_build_array(u.id,
                (SELECT json_agg(json_build_array(c.cap_type, c.model, c.cap_limit, c.action))
                   FROM caps c WHERE c.user_id = u.id),
                (SELECT json_agg(json_build_array(s.cap_type, s.period, s.model, s.amount))
                   FROM spend s WHERE s.user_id = u.id AND (
                     (s.cap_type = 'daily'
                      AND s.period = (t AT TIME ZONE 'UTC')::date - date '0001-01-01' + 1)
                     OR (s.cap_type = 'monthly' AND s.period =
                      extract(year FROM t AT TIME ZONE 'UTC')::int * 12
                      + extract(month FROM t AT TIME ZONE 'UTC')::int - 1))),
                (SELECT w.amount FROM allowance_used w WHERE w.user_id = u.id AND w.month =
                   extract(year FROM t AT TIME ZONE 'UTC')::int * 12
                   + extract(month FROM t AT TIME ZONE 'UTC')::int - 1)))
            FROM jsonb_array_elements_text(q->'users') AS u(id)) END,
        'keys', CASE WHEN q ? 'keys' THEN (
            SELECT json_agg(json_build_array(i.kind, i.account, i.key, i.op, i.fingerprint,
                i.result))
            FROM jsonb_array_elements(q->'keys') k JOIN idempotency i
              ON i.kind = k->>0 AND i.account = k->>1 AND i.key = k->>2) END,
        'holds', CASE WHEN q ? 'holds' THEN (
            SELECT json_agg(json_build_array(h.kind, h.account, h.id, h.amount,
                h.operation_type, h.model, h.use_allowance, h.expires_at, h.member, h.state,
                h.counted))
            FROM jsonb_array_elements(q->'holds') k JOIN holds h
              ON h.id = k->>2 AND h.kind = k->>0 AND h.account = k->>1) END,
        -- Unexpired lots in burn-down order until they cover the amount; then expired ones
        -- (those lapsing now included), oldest expiry first, likewise.
        'debits', CASE WHEN q ? 'debits' THEN (
            SELECT json_agg(json_build_array(k->>0, k->>1, (k->>2)::bigint,
                (SELECT json_agg(json_build_array(id, seq, remaining, expires_at)
                    ORDER BY coalesce(expires_at, 'infinity'), seq)
                   FROM (SELECT id, seq, remaining, expires_at, sum(remaining) OVER (
                           ORDER BY coalesce(expires_at, 'infinity'), seq) AS run
                         FROM lots WHERE kind = k->>0 AND account = k->>1 AND remaining > 0
                          AND NOT expired AND (expires_at IS NULL OR expires_at > t)) x
                  WHERE run - remaining < (k->>2)::bigint),
                (SELECT json_agg(json_build_array(id, seq, remaining, expires_at)
                    ORDER BY expires_at, seq)
                   FROM (SELECT id, seq, remaining, expires_at, sum(remaining) OVER (
                           ORDER BY expires_at, seq) AS run
                         FROM lots WHERE kind = k->>0 AND account = k->>1 AND remaining > 0
                          AND (expired OR expires_at <= t)) x
                  WHERE run - remaining < (k->>2)::bigint)))
            FROM jsonb_array_elements(q->'debits') k) END,
        'all_lots', CASE WHEN q ? 'all_lots' THEN (
            SELECT json_agg(json_build_array(k->>0, k->>1, (SELECT json_agg(json_build_array(
                    l.id, l.seq, l.remaining, l.expires_at, l.expired OR l.expires_at <= t)
                  ORDER BY l.expired OR l.expires_at <= t,
                    CASE WHEN l.expired OR l.expires_at <= t THEN l.expires_at
                    ELSE coalesce(l.expires_at, 'infinity') END, l.seq)
                FROM lots l WHERE l.kind = k->>0 AND l.account = k->>1 AND l.remaining > 0)))
            FROM jsonb_array_elements(q->'all_lots') k) END,
        -- A membership with the member's spend this month and counted holds on the pool.
        'members', CASE WHEN q ? 'members' THEN (
            SELECT json_agg(json_build_array(k->>0, k->>1,
                (SELECT json_build_array(m.role, m.spend_cap) FROM team_members m
                  WHERE m.team_id = k->>0 AND m.user_id = k->>1),
                (SELECT s.amount FROM member_spend s WHERE s.team_id = k->>0
                  AND s.user_id = k->>1 AND s.month =
                   extract(year FROM t AT TIME ZONE 'UTC')::int * 12
                   + extract(month FROM t AT TIME ZONE 'UTC')::int - 1),
                (SELECT r.amount FROM reserved_by_member r WHERE r.kind = 't'
                  AND r.account = k->>0 AND r.member = k->>1)))
            FROM jsonb_array_elements(q->'members') k) END,
        'member_lists', CASE WHEN q ? 'member_lists' THEN (
            SELECT json_agg(json_build_array(k.team, (SELECT json_agg(json_build_array(
                    m.user_id, m.role, m.spend_cap, s.amount) ORDER BY m.user_id)
                FROM team_members m LEFT JOIN member_spend s
                  ON s.team_id = m.team_id AND s.user_id = m.user_id AND s.month =
                   extract(year FROM t AT TIME ZONE 'UTC')::int * 12
                   + extract(month FROM t AT TIME ZONE 'UTC')::int - 1
                WHERE m.team_id = k.team)))
            FROM jsonb_array_elements_text(q->'member_lists') AS k(team)) END,
        'member_counts', CASE WHEN q ? 'member_counts' THEN (
            SELECT json_agg(json_build_array(k.team,
                (SELECT count(*) FROM team_members m WHERE m.team_id = k.team)))
            FROM jsonb_array_elements_text(q->'member_counts') AS k(team)) END,
        'pricing', CASE WHEN (q->>'pricing')::boolean THEN (
            SELECT json_build_array(s.value, (SELECT coalesce(max(version), 0) FROM pricing))
            FROM settings s WHERE s.key = 'pricing') END,
        'versions', CASE WHEN q ? 'versions' THEN (
            SELECT json_agg(json_build_array(version, id, config, label, created_at))
            FROM pricing WHERE version IN (
                SELECT (jsonb_array_elements_text(q->'versions'))::int)) END,
        'history', CASE WHEN (q->>'history')::boolean THEN (
            SELECT coalesce(json_agg(json_build_array(version, id, config, label, created_at)
                ORDER BY version DESC), '[]') FROM pricing) END,
        -- A refunded row with the lots it drew from and its key's stored results.
        'debit_rows', CASE WHEN q ? 'debit_rows' THEN (
            SELECT json_agg(json_build_array(g.id, g.kind, g.account, g.amount, g.type,
                g.created_at, g.draws, g.draw_refunds, g.spender, g.model,
                (SELECT json_agg(json_build_array(l.id, l.seq, l.remaining, l.expires_at))
                   FROM lots l WHERE l.id IN (SELECT jsonb_array_elements(g.draws)->>0)),
                (SELECT json_agg(json_build_array(i.op, i.fingerprint, i.result))
                   FROM idempotency i WHERE i.kind = g.kind AND i.account = g.account
                    AND i.key = k->>1)))
            FROM jsonb_array_elements(q->'debit_rows') k JOIN ledger g ON g.id = k->>0) END,
        -- Pages of an account's ledger, newest first, one more row than asked for.
        'pages', CASE WHEN q ? 'pages' THEN (
            SELECT json_agg((SELECT coalesce(json_agg(json_build_array(p.seq, p.id, p.kind,
                    p.account, p.amount, p.type, p.balance_after, p.metadata, p.created_at,
                    p.reservation_id, p.idempotency_key, p.refunded, p.spender, p.model,
                    p.operation_type, p.allowance) ORDER BY p.seq DESC), '[]')
                FROM (SELECT * FROM ledger g WHERE g.kind = k->>0 AND g.account = k->>1
                  AND (k->3 = 'null' OR g.seq < (k->>3)::bigint)
                  AND (k->4 = 'null' OR g.type IN (SELECT jsonb_array_elements_text(k->4)))
                  AND (k->5 = 'null' OR g.created_at >= (k->>5)::timestamptz)
                  AND (k->6 = 'null' OR g.created_at < (k->>6)::timestamptz)
                  ORDER BY g.seq DESC LIMIT (k->>2)::int + 1) p) ORDER BY n)
            FROM jsonb_array_elements(q->'pages') WITH ORDINALITY AS e(k, n)) END,
        'sweep', CASE WHEN (q->>'sweep')::boolean THEN (
            SELECT coalesce(json_agg(json_build_array(l.kind, l.account, l.id, l.seq,
                l.remaining, l.expires_at) ORDER BY l.kind, l.account, l.seq), '[]')
            FROM lots l WHERE l.remaining > 0 AND l.expires_at IS NOT NULL
             AND l.expires_at <= t AND jsonb_build_array(jsonb_build_array(l.kind, l.account)) <@ swept) END
    )::text;
END;
$fn$;

CREATE FUNCTION ducto_write(w jsonb) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF w ? 'accounts_new' THEN
        INSERT INTO accounts (kind, id, balance, lifetime_purchased, reserved, expired_unswept,
                              plan_id, name, caps)
        SELECT x->>0, x->>1, (x->>2)::bigint, (x->>3)::bigint, (x->>4)::bigint,
               (x->>5)::bigint, x->>6, x->>7, (x->>8)::int
        FROM jsonb_array_elements(w->'accounts_new') x;
    END IF;
    IF w ? 'accounts' THEN
        UPDATE accounts a SET balance = (x->>2)::bigint, lifetime_purchased = (x->>3)::bigint,
               reserved = (x->>4)::bigint, expired_unswept = (x->>5)::bigint,
               plan_id = x->>6, name = x->>7, caps = (x->>8)::int
        FROM jsonb_array_elements(w->'accounts') x
        WHERE a.kind = x->>0 AND a.id = x->>1;
    END IF;
    IF w ? 'holds_new' THEN
        INSERT INTO holds (id, kind, account, amount, operation_type, model, use_allowance,
                           expires_at, state, counted, member)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint, x->>4, x->>5, (x->>6)::boolean,
               (x->>7)::timestamptz, (x->>8)::smallint, (x->>9)::boolean, x->>10
        FROM jsonb_array_elements(w->'holds_new') x;
    END IF;
    -- A hold no longer counted, and closed in a state when one is given.
    IF w ? 'holds' THEN
        UPDATE holds h SET state = coalesce((x->>1)::smallint, h.state), counted = false
        FROM jsonb_array_elements(w->'holds') x WHERE h.id = x->>0;
    END IF;
    IF w ? 'lots_new' THEN
        INSERT INTO lots (id, kind, account, remaining, expires_at, expired)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint, (x->>4)::timestamptz, (x->>5)::boolean
        FROM jsonb_array_elements(w->'lots_new') WITH ORDINALITY AS e(x, n) ORDER BY n;
    END IF;
    IF w ? 'lots' THEN
        UPDATE lots l SET remaining = coalesce((x->>1)::bigint, l.remaining),
               expired = coalesce((x->>2)::boolean, l.expired)
        FROM jsonb_array_elements(w->'lots') x WHERE l.id = x->>0;
    END IF;
    IF w ? 'ledger' THEN
        INSERT INTO ledger (id, kind, account, amount, type, balance_after, metadata,
                            created_at, reservation_id, idempotency_key, draws, spender, model,
                            operation_type, allowance)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint, x->>4, (x->>5)::bigint, x->6,
               (x->>7)::timestamptz, x->>8, x->>9, nullif(x->10, 'null'), x->>11, x->>12,
               x->>13, (x->>14)::bigint
        FROM jsonb_array_elements(w->'ledger') WITH ORDINALITY AS e(x, n) ORDER BY n;
    END IF;
    IF w ? 'refunds' THEN
        UPDATE ledger g SET refunded = (x->>1)::bigint, draw_refunds = x->2
        FROM jsonb_array_elements(w->'refunds') x WHERE g.id = x->>0;
    END IF;
    IF w ? 'keys' THEN
        INSERT INTO idempotency (kind, account, op, key, fingerprint, result)
        SELECT x->>0, x->>1, x->>2, x->>3, x->>4, x->>5
        FROM jsonb_array_elements(w->'keys') x;
    END IF;
    -- Running totals: each row adds its amount to the stored one.
    IF w ? 'model' THEN
        INSERT INTO reserved_by_model (kind, account, model, amount)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint FROM jsonb_array_elements(w->'model') x
        ON CONFLICT (kind, account, model)
        DO UPDATE SET amount = reserved_by_model.amount + excluded.amount;
    END IF;
    IF w ? 'member' THEN
        INSERT INTO reserved_by_member (kind, account, member, amount)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint FROM jsonb_array_elements(w->'member') x
        ON CONFLICT (kind, account, member)
        DO UPDATE SET amount = reserved_by_member.amount + excluded.amount;
    END IF;
    IF w ? 'spend' THEN
        INSERT INTO spend (user_id, cap_type, period, model, amount)
        SELECT x->>0, x->>1, (x->>2)::int, x->>3, (x->>4)::bigint
        FROM jsonb_array_elements(w->'spend') x
        ON CONFLICT (user_id, cap_type, period, model)
        DO UPDATE SET amount = spend.amount + excluded.amount;
    END IF;
    IF w ? 'member_spend' THEN
        INSERT INTO member_spend (team_id, user_id, month, amount)
        SELECT x->>0, x->>1, (x->>2)::int, (x->>3)::bigint
        FROM jsonb_array_elements(w->'member_spend') x
        ON CONFLICT (team_id, user_id, month)
        DO UPDATE SET amount = member_spend.amount + excluded.amount;
    END IF;
    IF w ? 'allowance' THEN
        INSERT INTO allowance_used (user_id, month, amount)
        SELECT x->>0, (x->>1)::int, (x->>2)::bigint FROM jsonb_array_elements(w->'allowance') x
        ON CONFLICT (user_id, month)
        DO UPDATE SET amount = allowance_used.amount + excluded.amount;
    END IF;
    IF w ? 'caps_removed' THEN
        DELETE FROM caps c USING jsonb_array_elements(w->'caps_removed') x
        WHERE c.user_id = x->>0 AND c.cap_type = x->>1 AND c.model = x->>2;
    END IF;
    IF w ? 'caps' THEN
        INSERT INTO caps (user_id, cap_type, model, cap_limit, action)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint, x->>4 FROM jsonb_array_elements(w->'caps') x
        ON CONFLICT (user_id, cap_type, model)
        DO UPDATE SET cap_limit = excluded.cap_limit, action = excluded.action;
    END IF;
    IF w ? 'members_removed' THEN
        DELETE FROM team_members m USING jsonb_array_elements(w->'members_removed') x
        WHERE m.team_id = x->>0 AND m.user_id = x->>1;
    END IF;
    IF w ? 'members' THEN
        INSERT INTO team_members (team_id, user_id, role, spend_cap)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint FROM jsonb_array_elements(w->'members') x
        ON CONFLICT (team_id, user_id)
        DO UPDATE SET role = excluded.role, spend_cap = excluded.spend_cap;
    END IF;
    IF w ? 'pricing' THEN
        INSERT INTO pricing (version, id, config, label, created_at)
        SELECT (x->>0)::int, x->>1, x->>2, x->>3, (x->>4)::timestamptz
        FROM jsonb_array_elements(w->'pricing') x;
    END IF;
    IF w ? 'activate' THEN
        UPDATE settings SET value = w->>'activate' WHERE key = 'pricing';
    END IF;
END;
$fn$;
