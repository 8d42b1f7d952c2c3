-- Scheduled pricing versions, budget scopes and auto top-up claims.
--
-- A pricing version takes effect at `effective_at` (its publication, for every version written
-- before this migration) unless it was cancelled before; the 'pricing' setting becomes the
-- pointer: the version the last immediate publication or activation put in force, and when.
-- Holds, ledger rows, window spend, caps and archived rollups carry a budget scope ('' or NULL
-- for none), and counted holds are totalled per scope. An account has at most one top-up claim
-- in flight and a total of top-ups per UTC month (a window counter `prune` removes once the
-- month closed). Every existing row keeps its data; the five data-moving functions are
-- redefined in full.

ALTER TABLE pricing ADD COLUMN effective_at timestamptz;
ALTER TABLE pricing ADD COLUMN cancelled_at timestamptz;
UPDATE pricing SET effective_at = created_at;
ALTER TABLE pricing ALTER COLUMN effective_at SET NOT NULL;
CREATE INDEX pricing_scheduled ON pricing (effective_at) WHERE cancelled_at IS NULL;

-- 'pricing': the pointer, as the JSON text [version, at] ('' before any version was put in
-- force). The version active before this migration stays in force from the latest
-- publication on, so no earlier version counts as scheduled after it.
UPDATE settings SET value = json_build_array(value::integer,
        (SELECT max(created_at) FROM pricing))::text
 WHERE key = 'pricing' AND value <> '';

ALTER TABLE holds ADD COLUMN scope text;
ALTER TABLE ledger ADD COLUMN scope text;

-- Counted holds in a scope, per account, model ('' is every model) and scope.
CREATE TABLE reserved_by_scope (
    kind text NOT NULL,
    account text NOT NULL,
    model text NOT NULL,
    scope text NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (kind, account, scope, model)
);

-- Window spend and caps per scope ('' is no scope: every scope for spend, all usage for caps).
ALTER TABLE spend ADD COLUMN scope text NOT NULL DEFAULT '';
ALTER TABLE spend DROP CONSTRAINT spend_pkey,
    ADD PRIMARY KEY (user_id, cap_type, period, model, scope);
ALTER TABLE caps ADD COLUMN scope text NOT NULL DEFAULT '';
ALTER TABLE caps DROP CONSTRAINT caps_pkey, ADD PRIMARY KEY (user_id, cap_type, model, scope);

-- Archived paid usage per UTC day, user, model and scope ('' for none).
ALTER TABLE rollups ADD COLUMN scope text NOT NULL DEFAULT '';
ALTER TABLE rollups DROP CONSTRAINT rollups_pkey, ADD PRIMARY KEY (day, user_id, model, scope);

-- A user's one top-up in flight (expired or not) and its top-ups per UTC month.
CREATE TABLE top_up_claims (
    user_id text PRIMARY KEY,
    id text NOT NULL,
    amount bigint NOT NULL,
    month integer NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE TABLE top_up_totals (
    user_id text NOT NULL,
    month integer NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (user_id, month)
);

CREATE OR REPLACE FUNCTION ducto_read(q jsonb) RETURNS text
LANGUAGE plpgsql
-- Every statement is a handful of point lookups driven by the document: planned for index
-- access whatever the statistics say, since a plan made while the tables were small and kept
-- for the session would otherwise scan them whole once they are large.
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan SET jit = off
AS $fn$
DECLARE
    t timestamptz;
    locks jsonb := coalesce(q->'lock', '[]');
    reads jsonb := coalesce(q->'accounts', '[]');
    swept jsonb := '[]';
    extra jsonb;
    spenders jsonb;
    h bigint;
    doc text;
    part text;
    capped text[];
    planned text[];
    got bigint;
BEGIN
    -- A refund names a ledger row: lock its account and the spender's.
    IF q ? 'refunds' THEN
        SELECT coalesce(jsonb_agg(DISTINCT jsonb_build_array(kind, account)), '[]'),
               coalesce(jsonb_agg(DISTINCT jsonb_build_array('u', coalesce(spender, account))),
                        '[]')
          INTO extra, spenders
          FROM ledger WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text(q->'refunds')));
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
    -- One transaction-scoped advisory lock per account ([kind, id]), taken in the order of
    -- their hashes, so batches in different processes never deadlock. Every write to an
    -- account's rows happens under its lock; an account need not exist to be locked.
    FOR h IN SELECT DISTINCT hashtextextended((x->>0) || '/' || (x->>1), 7079)
               FROM jsonb_array_elements(locks) x ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(h);
    END LOOP;
    -- "Now" is read after the locks, so a later holder of a lock has a later now.
    t := coalesce((q->>'now')::timestamptz, clock_timestamp());
    doc := '{"now":' || to_json(t)::text;
    -- Each part is a statement of its own, run only when asked for (or when an account's
    -- own columns show it can matter): unused parts cost nothing.
    IF jsonb_array_length(reads) > 0 THEN
        -- Each account with its holds past their TTL still counted, and its lots past
        -- their expiry.
        SELECT json_agg(json_build_array(a.kind, a.id, a.balance, a.lifetime_purchased,
            a.reserved, a.expired_unswept, a.plan_id, a.name, a.caps,
            CASE WHEN a.reserved > 0 THEN (SELECT json_agg(json_build_array(h.id, h.amount,
                h.model, h.member, h.expires_at, h.scope)) FROM holds h WHERE h.kind = a.kind
                AND h.account = a.id AND h.counted AND h.expires_at <= t) END,
            (SELECT json_agg(json_build_array(l.id, l.remaining, l.seq, l.expires_at))
               FROM lots l WHERE l.kind = a.kind AND l.account = a.id AND l.remaining > 0
                AND NOT l.expired AND coalesce(l.expires_at, 'infinity') <= t)))::text,
            array_agg(a.id) FILTER (WHERE a.kind = 'u' AND a.caps > 0),
            array_agg(a.id) FILTER (WHERE a.kind = 'u' AND a.plan_id IS NOT NULL)
          INTO part, capped, planned
          FROM (SELECT DISTINCT x->>0 AS kind, x->>1 AS id FROM jsonb_array_elements(reads) x) k
          JOIN accounts a ON a.kind = k.kind AND a.id = k.id;
        doc := doc || ',"accounts":' || coalesce(part, 'null');
    END IF;
    IF capped IS NOT NULL THEN
        -- A user with caps: the caps, this window's spend (unscoped, and in each scope a cap
        -- names), counted holds by model, and counted holds in each scope a cap names (null
        -- when no cap is scoped).
        SELECT json_agg(json_build_array(u.id, c.caps,
            (SELECT json_agg(json_build_array(s.cap_type, s.period, s.model, s.scope, s.amount))
               FROM spend s WHERE s.user_id = u.id AND (
                 (s.cap_type = 'daily'
                  AND s.period = (t AT TIME ZONE 'UTC')::date - date '0001-01-01' + 1)
                 OR (s.cap_type = 'monthly' AND s.period =
                  extract(year FROM t AT TIME ZONE 'UTC')::int * 12
                  + extract(month FROM t AT TIME ZONE 'UTC')::int - 1))
                AND (s.scope = '' OR s.scope = ANY(c.scopes))),
            (SELECT json_object_agg(r.model, r.amount) FROM reserved_by_model r
              WHERE r.kind = 'u' AND r.account = u.id),
            CASE WHEN c.scopes IS NOT NULL THEN (SELECT json_agg(json_build_array(r.model,
                r.scope, r.amount)) FROM reserved_by_scope r WHERE r.kind = 'u'
                AND r.account = u.id AND r.scope = ANY(c.scopes)) END))::text
          INTO part
          FROM unnest(capped) AS u(id),
            LATERAL (SELECT json_agg(json_build_array(x.cap_type, x.model, x.cap_limit,
                       x.action, x.scope)) AS caps,
                     array_agg(DISTINCT x.scope) FILTER (WHERE x.scope <> '') AS scopes
                       FROM caps x WHERE x.user_id = u.id) c;
        doc := doc || ',"caps":' || part;
    END IF;
    IF planned IS NOT NULL THEN
        -- A user with a plan: the allowance used this month.
        SELECT json_agg(json_build_array(u.id, (SELECT w.amount FROM allowance_used w
            WHERE w.user_id = u.id AND w.month =
             extract(year FROM t AT TIME ZONE 'UTC')::int * 12
             + extract(month FROM t AT TIME ZONE 'UTC')::int - 1)))::text
          INTO part
          FROM unnest(planned) AS u(id);
        doc := doc || ',"allowance":' || part;
    END IF;
    IF q ? 'debits' THEN
        -- For a debit ([kind, id, amount]): unexpired lots in burn-down order until they
        -- cover the amount; then, only if the account has any unswept, expired ones (those
        -- lapsing now included), oldest expiry first, likewise.
        SELECT json_agg(json_build_array(k->>0, k->>1,
            (SELECT json_agg(json_build_array(id, seq, remaining, expires_at)
                ORDER BY coalesce(expires_at, 'infinity'), seq)
               FROM (SELECT id, seq, remaining, expires_at, sum(remaining) OVER (
                       ORDER BY coalesce(expires_at, 'infinity'), seq) AS run
                     FROM lots WHERE kind = k->>0 AND account = k->>1 AND remaining > 0
                      AND NOT expired AND coalesce(expires_at, 'infinity') > t) x
              WHERE run - remaining < (k->>2)::bigint),
            CASE WHEN (SELECT a.expired_unswept > 0 FROM accounts a
                        WHERE a.kind = k->>0 AND a.id = k->>1) THEN coalesce((SELECT
                json_agg(json_build_array(id, seq, remaining, expires_at)
                ORDER BY expires_at, seq)
               FROM (SELECT id, seq, remaining, expires_at, sum(remaining) OVER (
                       ORDER BY expires_at, seq) AS run
                     FROM (SELECT id, seq, remaining, expires_at FROM lots
                            WHERE kind = k->>0 AND account = k->>1 AND remaining > 0
                             AND expired
                           UNION ALL
                           SELECT id, seq, remaining, expires_at FROM lots
                            WHERE kind = k->>0 AND account = k->>1 AND remaining > 0
                             AND NOT expired AND coalesce(expires_at, 'infinity') <= t) e) x
              WHERE run - remaining < (k->>2)::bigint), '[]') END))::text
          INTO part
          FROM jsonb_array_elements(q->'debits') k;
        doc := doc || ',"debits":' || coalesce(part, 'null');
    END IF;
    IF q ? 'keys' THEN
        -- Stored results by idempotency key ([kind, id, key]), with when each was written;
        -- OFFSET 0 keeps each lookup a probe of the key's index.
        SELECT json_agg(json_build_array(k->>0, k->>1, i.key, i.op, i.fingerprint,
            i.result::json, i.created_at))::text
          INTO part
          FROM jsonb_array_elements(q->'keys') k,
            LATERAL (SELECT * FROM idempotency WHERE kind = k->>0 AND account = k->>1
                     AND key = k->>2 OFFSET 0) i;
        doc := doc || ',"keys":' || coalesce(part, 'null');
    END IF;
    IF q ? 'holds' THEN
        SELECT json_agg(json_build_array(h.kind, h.account, h.id, h.amount,
            h.operation_type, h.model, h.use_allowance, h.expires_at, h.member, h.state,
            h.counted, h.scope))::text
          INTO part
          FROM jsonb_array_elements(q->'holds') k,
            LATERAL (SELECT * FROM holds WHERE id = k->>2 AND kind = k->>0
                     AND account = k->>1 OFFSET 0) h;
        doc := doc || ',"holds":' || coalesce(part, 'null');
    END IF;
    IF q ? 'all_lots' THEN
        -- Every lot with credits: unexpired ones in burn-down order, then expired ones.
        SELECT json_agg(json_build_array(k->>0, k->>1, (SELECT json_agg(json_build_array(
                l.id, l.seq, l.remaining, l.expires_at, l.gone)
              ORDER BY l.gone, CASE WHEN l.gone THEN l.expires_at
                ELSE coalesce(l.expires_at, 'infinity') END, l.seq)
            FROM (SELECT id, seq, remaining, expires_at,
                         coalesce(expires_at, 'infinity') <= t AS gone FROM lots
                   WHERE kind = k->>0 AND account = k->>1 AND remaining > 0 AND NOT expired
                  UNION ALL
                  SELECT id, seq, remaining, expires_at, true FROM lots
                   WHERE kind = k->>0 AND account = k->>1 AND remaining > 0 AND expired) l)))::text
          INTO part
          FROM jsonb_array_elements(q->'all_lots') k;
        doc := doc || ',"all_lots":' || coalesce(part, 'null');
    END IF;
    IF q ? 'members' THEN
        -- A membership with the member's spend this month and counted holds on the pool.
        SELECT json_agg(json_build_array(k->>0, k->>1,
            (SELECT json_build_array(m.role, m.spend_cap) FROM team_members m
              WHERE m.team_id = k->>0 AND m.user_id = k->>1),
            (SELECT s.amount FROM member_spend s WHERE s.team_id = k->>0
              AND s.user_id = k->>1 AND s.month =
               extract(year FROM t AT TIME ZONE 'UTC')::int * 12
               + extract(month FROM t AT TIME ZONE 'UTC')::int - 1),
            (SELECT r.amount FROM reserved_by_member r WHERE r.kind = 't'
              AND r.account = k->>0 AND r.member = k->>1)))::text
          INTO part
          FROM jsonb_array_elements(q->'members') k;
        doc := doc || ',"members":' || coalesce(part, 'null');
    END IF;
    IF q ? 'member_lists' THEN
        SELECT json_agg(json_build_array(k.team, (SELECT json_agg(json_build_array(
                m.user_id, m.role, m.spend_cap, s.amount) ORDER BY m.user_id)
            FROM team_members m LEFT JOIN member_spend s
              ON s.team_id = m.team_id AND s.user_id = m.user_id AND s.month =
               extract(year FROM t AT TIME ZONE 'UTC')::int * 12
               + extract(month FROM t AT TIME ZONE 'UTC')::int - 1
            WHERE m.team_id = k.team)))::text
          INTO part
          FROM jsonb_array_elements_text(q->'member_lists') AS k(team);
        doc := doc || ',"member_lists":' || coalesce(part, 'null');
    END IF;
    IF q ? 'member_counts' THEN
        SELECT json_agg(json_build_array(k.team,
            (SELECT count(*) FROM team_members m WHERE m.team_id = k.team)))::text
          INTO part
          FROM jsonb_array_elements_text(q->'member_counts') AS k(team);
        doc := doc || ',"member_counts":' || coalesce(part, 'null');
    END IF;
    -- What decides the version in force: the pointer ([version, at] or null), the highest
    -- version, and [effective_at, version] of each version not cancelled that takes effect
    -- after the pointer (null for none). 2: always; 1: only if an account read has a plan.
    IF (q->>'pricing')::int = 2 OR ((q->>'pricing')::int = 1 AND planned IS NOT NULL) THEN
        SELECT json_build_array(p.pointer, (SELECT coalesce(max(version), 0) FROM pricing),
            (SELECT json_agg(json_build_array(v.effective_at, v.version)) FROM pricing v
              WHERE v.cancelled_at IS NULL AND v.effective_at > p.since))::text
          INTO part
          FROM (SELECT nullif(s.value, '')::json AS pointer,
                       coalesce((nullif(s.value, '')::json->>1)::timestamptz, '-infinity')
                         AS since
                  FROM settings s WHERE s.key = 'pricing') p;
        doc := doc || ',"pricing":' || coalesce(part, 'null');
    END IF;
    IF q ? 'versions' THEN
        SELECT json_agg(json_build_array(version, id, config, label, created_at, effective_at,
            cancelled_at))::text
          INTO part
          FROM pricing WHERE version = ANY(ARRAY(SELECT (jsonb_array_elements_text(q->'versions'))::int));
        doc := doc || ',"versions":' || coalesce(part, 'null');
    END IF;
    IF q ? 'history' THEN
        SELECT coalesce(json_agg(json_build_array(version, id, config, label, created_at,
            effective_at, cancelled_at) ORDER BY version DESC), '[]')::text
          INTO part
          FROM pricing;
        doc := doc || ',"history":' || part;
    END IF;
    IF q ? 'debit_rows' THEN
        -- A refunded row with the lots it drew from and its key's stored results.
        SELECT json_agg(json_build_array(g.id, g.kind, g.account, g.amount, g.type,
            g.created_at, g.draws, g.draw_refunds, g.spender, g.model,
            (SELECT json_agg(json_build_array(l.id, l.seq, l.remaining, l.expires_at))
               FROM lots l WHERE l.id = ANY(ARRAY(SELECT jsonb_array_elements(g.draws)->>0))),
            (SELECT json_agg(json_build_array(i.op, i.fingerprint, i.result::json,
                i.created_at))
               FROM idempotency i WHERE i.kind = g.kind AND i.account = g.account
                AND i.key = k->>1), g.scope))::text, count(*)
          INTO part, got
          FROM jsonb_array_elements(q->'debit_rows') k JOIN ledger g ON g.id = k->>0;
        doc := doc || ',"debit_rows":' || coalesce(part, 'null');
        -- Only when a row asked for is missing: which of the missing ones were archived.
        IF got < jsonb_array_length(q->'debit_rows') THEN
            SELECT json_agg(a.id)::text
              INTO part
              FROM jsonb_array_elements(q->'debit_rows') k JOIN archived_rows a ON a.id = k->>0;
            doc := doc || ',"archived":' || coalesce(part, 'null');
        END IF;
    END IF;
    IF q ? 'pages' THEN
        -- Pages of an account's ledger, newest first, one more row than asked for.
        SELECT json_agg((SELECT coalesce(json_agg(json_build_array(p.seq, p.id, p.kind,
                p.account, p.amount, p.type, p.balance_after, p.metadata, p.created_at,
                p.reservation_id, p.idempotency_key, p.refunded, p.spender, p.model,
                p.operation_type, p.allowance, p.scope) ORDER BY p.seq DESC), '[]')
            FROM (SELECT * FROM ledger g WHERE g.kind = k->>0 AND g.account = k->>1
              AND (k->3 = 'null' OR g.seq < (k->>3)::bigint)
              AND (k->4 = 'null' OR g.type = ANY(ARRAY(SELECT jsonb_array_elements_text(k->4))))
              AND (k->5 = 'null' OR g.created_at >= (k->>5)::timestamptz)
              AND (k->6 = 'null' OR g.created_at < (k->>6)::timestamptz)
              ORDER BY g.seq DESC LIMIT (k->>2)::int + 1) p) ORDER BY n)::text
          INTO part
          FROM jsonb_array_elements(q->'pages') WITH ORDINALITY AS e(k, n);
        doc := doc || ',"pages":' || coalesce(part, 'null');
    END IF;
    IF q ? 'top_ups' THEN
        -- A user's top-up claim ([id, amount, month, expires_at] or null) and this month's
        -- total of top-ups (null for none).
        SELECT json_agg(json_build_array(k.u,
            (SELECT json_build_array(c.id, c.amount, c.month, c.expires_at)
               FROM top_up_claims c WHERE c.user_id = k.u),
            (SELECT o.amount FROM top_up_totals o WHERE o.user_id = k.u AND o.month =
              extract(year FROM t AT TIME ZONE 'UTC')::int * 12
              + extract(month FROM t AT TIME ZONE 'UTC')::int - 1)))::text
          INTO part
          FROM jsonb_array_elements_text(q->'top_ups') AS k(u);
        doc := doc || ',"top_ups":' || coalesce(part, 'null');
    END IF;
    IF (q->>'sweep')::boolean THEN
        SELECT coalesce(json_agg(json_build_array(l.kind, l.account, l.id, l.seq,
            l.remaining, l.expires_at) ORDER BY l.kind, l.account, l.seq), '[]')::text
          INTO part
          FROM lots l WHERE l.remaining > 0 AND l.expires_at IS NOT NULL
           AND l.expires_at <= t
           AND jsonb_build_array(jsonb_build_array(l.kind, l.account)) <@ swept;
        doc := doc || ',"sweep":' || part;
    END IF;
    RETURN doc || '}';
END;
$fn$;

CREATE OR REPLACE FUNCTION ducto_write(w jsonb) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan SET jit = off
AS $fn$
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
                           expires_at, state, counted, member, scope)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint, x->>4, x->>5, (x->>6)::boolean,
               (x->>7)::timestamptz, (x->>8)::smallint, (x->>9)::boolean, x->>10, x->>11
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
                            operation_type, allowance, scope)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint, x->>4, (x->>5)::bigint, x->6,
               (x->>7)::timestamptz, x->>8, x->>9, nullif(x->10, 'null'), x->>11, x->>12,
               x->>13, (x->>14)::bigint, x->>15
        FROM jsonb_array_elements(w->'ledger') WITH ORDINALITY AS e(x, n) ORDER BY n;
    END IF;
    IF w ? 'refunds' THEN
        UPDATE ledger g SET refunded = (x->>1)::bigint, draw_refunds = x->2
        FROM jsonb_array_elements(w->'refunds') x WHERE g.id = x->>0;
    END IF;
    -- A key written again replaces its record, which was past retention.
    IF w ? 'keys' THEN
        INSERT INTO idempotency (kind, account, op, key, fingerprint, result, created_at)
        SELECT x->>0, x->>1, x->>2, x->>3, x->>4, x->>5, (x->>6)::timestamptz
        FROM jsonb_array_elements(w->'keys') x
        ON CONFLICT (kind, account, key, op)
        DO UPDATE SET fingerprint = excluded.fingerprint, result = excluded.result,
                      created_at = excluded.created_at;
    END IF;
    -- Running totals: each row adds its amount to the stored one.
    IF w ? 'model' THEN
        INSERT INTO reserved_by_model (kind, account, model, amount)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint FROM jsonb_array_elements(w->'model') x
        ON CONFLICT (kind, account, model)
        DO UPDATE SET amount = reserved_by_model.amount + excluded.amount;
    END IF;
    IF w ? 'scope' THEN
        INSERT INTO reserved_by_scope (kind, account, model, scope, amount)
        SELECT x->>0, x->>1, x->>2, x->>3, (x->>4)::bigint FROM jsonb_array_elements(w->'scope') x
        ON CONFLICT (kind, account, scope, model)
        DO UPDATE SET amount = reserved_by_scope.amount + excluded.amount;
    END IF;
    IF w ? 'member' THEN
        INSERT INTO reserved_by_member (kind, account, member, amount)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint FROM jsonb_array_elements(w->'member') x
        ON CONFLICT (kind, account, member)
        DO UPDATE SET amount = reserved_by_member.amount + excluded.amount;
    END IF;
    IF w ? 'spend' THEN
        INSERT INTO spend (user_id, cap_type, period, model, scope, amount)
        SELECT x->>0, x->>1, (x->>2)::int, x->>3, x->>4, (x->>5)::bigint
        FROM jsonb_array_elements(w->'spend') x
        ON CONFLICT (user_id, cap_type, period, model, scope)
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
    IF w ? 'top_up' THEN
        INSERT INTO top_up_totals (user_id, month, amount)
        SELECT x->>0, (x->>1)::int, (x->>2)::bigint FROM jsonb_array_elements(w->'top_up') x
        ON CONFLICT (user_id, month)
        DO UPDATE SET amount = top_up_totals.amount + excluded.amount;
    END IF;
    -- A user's top-up claim replaced ([user, claim]) or removed ([user, null]).
    IF w ? 'top_up_claims' THEN
        DELETE FROM top_up_claims c USING jsonb_array_elements(w->'top_up_claims') x
        WHERE c.user_id = x->>0 AND x->1 = 'null';
        INSERT INTO top_up_claims (user_id, id, amount, month, expires_at)
        SELECT x->>0, x->1->>0, (x->1->>1)::bigint, (x->1->>2)::int, (x->1->>3)::timestamptz
        FROM jsonb_array_elements(w->'top_up_claims') x WHERE x->1 <> 'null'
        ON CONFLICT (user_id)
        DO UPDATE SET id = excluded.id, amount = excluded.amount, month = excluded.month,
                      expires_at = excluded.expires_at;
    END IF;
    IF w ? 'caps_removed' THEN
        DELETE FROM caps c USING jsonb_array_elements(w->'caps_removed') x
        WHERE c.user_id = x->>0 AND c.cap_type = x->>1 AND c.model = x->>2
          AND c.scope = x->>3;
    END IF;
    IF w ? 'caps' THEN
        INSERT INTO caps (user_id, cap_type, model, cap_limit, action, scope)
        SELECT x->>0, x->>1, x->>2, (x->>3)::bigint, x->>4, x->>5
        FROM jsonb_array_elements(w->'caps') x
        ON CONFLICT (user_id, cap_type, model, scope)
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
        INSERT INTO pricing (version, id, config, label, created_at, effective_at)
        SELECT (x->>0)::int, x->>1, x->>2, x->>3, (x->>4)::timestamptz, (x->>5)::timestamptz
        FROM jsonb_array_elements(w->'pricing') x;
    END IF;
    -- A scheduled version cancelled ([version, at]).
    IF w ? 'cancel' THEN
        UPDATE pricing p SET cancelled_at = (x->>1)::timestamptz
        FROM jsonb_array_elements(w->'cancel') x WHERE p.version = (x->>0)::int;
    END IF;
    -- The pointer ([version, at]): the version put in force at once, and when.
    IF w ? 'pointer' THEN
        UPDATE settings SET value = (w->'pointer')::text WHERE key = 'pricing';
    END IF;
END;
$fn$;

-- One chunk of `prune` (q: kind, limit, dry_run, and the cutoff the engine computed: before
-- for 'idempotency' and 'holds', the current day and month keys for 'windows'). Deletes at
-- most `limit` records and returns how many; a dry run counts them all and deletes nothing.
CREATE OR REPLACE FUNCTION ducto_prune(q jsonb) RETURNS bigint
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off
AS $fn$
DECLARE
    cutoff timestamptz := (q->>'before')::timestamptz;
    day_key integer := (q->>'day')::integer;
    month_key integer := (q->>'month')::integer;
    lim integer := (q->>'limit')::integer;
    dry boolean := (q->>'dry_run')::boolean;
    ids text[];
    h bigint;
    n bigint := 0;
    m bigint;
BEGIN
    IF q->>'kind' = 'idempotency' THEN
        IF dry THEN
            SELECT count(*) INTO n FROM idempotency WHERE created_at < cutoff;
            RETURN n;
        END IF;
        -- A record written again since it was picked has a new created_at: it stays.
        DELETE FROM idempotency WHERE ctid = ANY(ARRAY(SELECT ctid FROM idempotency
            WHERE created_at < cutoff ORDER BY created_at LIMIT lim))
          AND created_at < cutoff;
        GET DIAGNOSTICS n = ROW_COUNT;
    ELSIF q->>'kind' = 'holds' THEN
        IF dry THEN
            SELECT count(*) INTO n FROM holds WHERE NOT counted AND expires_at < cutoff;
            RETURN n;
        END IF;
        SELECT array_agg(id) INTO ids FROM (SELECT id FROM holds
            WHERE NOT counted AND expires_at < cutoff ORDER BY expires_at LIMIT lim) x;
        -- The accounts' locks, taken as ducto_read takes them (in hash order): a hold goes
        -- only while no operation on its account is between its read and its commit.
        FOR h IN SELECT DISTINCT hashtextextended(kind || '/' || account, 7079)
                   FROM holds WHERE id = ANY(ids) ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock(h);
        END LOOP;
        DELETE FROM holds WHERE id = ANY(ids) AND NOT counted AND expires_at < cutoff;
        GET DIAGNOSTICS n = ROW_COUNT;
    ELSIF q->>'kind' = 'windows' THEN
        IF dry THEN
            SELECT (SELECT count(*) FROM spend
                     WHERE (cap_type = 'daily' AND period < day_key)
                        OR (cap_type = 'monthly' AND period < month_key))
                 + (SELECT count(*) FROM allowance_used WHERE month < month_key)
                 + (SELECT count(*) FROM member_spend WHERE month < month_key)
                 + (SELECT count(*) FROM top_up_totals WHERE month < month_key)
              INTO n;
            RETURN n;
        END IF;
        DELETE FROM spend WHERE ctid = ANY(ARRAY(SELECT ctid FROM spend
            WHERE (cap_type = 'daily' AND period < day_key)
               OR (cap_type = 'monthly' AND period < month_key) LIMIT lim));
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n < lim THEN
            DELETE FROM allowance_used WHERE ctid = ANY(ARRAY(SELECT ctid FROM allowance_used
                WHERE month < month_key LIMIT lim - n));
            GET DIAGNOSTICS m = ROW_COUNT;
            n := n + m;
        END IF;
        IF n < lim THEN
            DELETE FROM member_spend WHERE ctid = ANY(ARRAY(SELECT ctid FROM member_spend
                WHERE month < month_key LIMIT lim - n));
            GET DIAGNOSTICS m = ROW_COUNT;
            n := n + m;
        END IF;
        IF n < lim THEN
            DELETE FROM top_up_totals WHERE ctid = ANY(ARRAY(SELECT ctid FROM top_up_totals
                WHERE month < month_key LIMIT lim - n));
            GET DIAGNOSTICS m = ROW_COUNT;
            n := n + m;
        END IF;
    END IF;
    RETURN n;
END;
$fn$;

-- Ledger rows created before q.before with seq in (q.after, q.upto], oldest seq first, at
-- most q.limit of them, in the columns of a page row; and the highest seq in the ledger. The
-- caller walks the ledger in seq ranges so no one statement scans it whole.
CREATE OR REPLACE FUNCTION ducto_archive_rows(q jsonb) RETURNS text
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan SET jit = off
AS $fn$
DECLARE
    part text;
BEGIN
    SELECT json_build_array(coalesce(json_agg(json_build_array(p.seq, p.id, p.kind, p.account,
            p.amount, p.type, p.balance_after, p.metadata, p.created_at, p.reservation_id,
            p.idempotency_key, p.refunded, p.spender, p.model, p.operation_type, p.allowance,
            p.scope) ORDER BY p.seq), '[]'), (SELECT max(seq) FROM ledger))::text
      INTO part
      FROM (SELECT * FROM ledger WHERE seq > (q->>'after')::bigint
              AND seq <= (q->>'upto')::bigint AND created_at < (q->>'before')::timestamptz
            ORDER BY seq LIMIT (q->>'limit')::integer) p;
    RETURN part;
END;
$fn$;

-- One archived chunk (q: rows [[id, refunded]], their accounts, rollups
-- [[day, user, model, scope, net, count]] with scope '' for none, before), inside the caller's transaction: under the
-- accounts' locks, delete each row still there with the refunded total it was read with,
-- remember those ids as archived, add the rollups and raise the horizon to `before`. Returns
-- how many rows were deleted: the caller rolls back unless that is all of them.
CREATE OR REPLACE FUNCTION ducto_archive(q jsonb) RETURNS bigint
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET plan_cache_mode = force_generic_plan SET jit = off
AS $fn$
DECLARE
    h bigint;
    n bigint;
BEGIN
    -- As ducto_read takes them: a refund of one of these rows runs wholly before or after.
    FOR h IN SELECT DISTINCT hashtextextended((x->>0) || '/' || (x->>1), 7079)
               FROM jsonb_array_elements(q->'accounts') x ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(h);
    END LOOP;
    WITH gone AS (
        DELETE FROM ledger g USING jsonb_array_elements(q->'rows') x
         WHERE g.id = x->>0 AND g.refunded = (x->>1)::bigint
        RETURNING g.id)
    INSERT INTO archived_rows (id) SELECT id FROM gone;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO rollups (day, user_id, model, scope, net, count)
    SELECT (x->>0)::integer, x->>1, x->>2, x->>3, (x->>4)::bigint, (x->>5)::bigint
      FROM jsonb_array_elements(q->'rollups') x
    ON CONFLICT (day, user_id, model, scope)
    DO UPDATE SET net = rollups.net + excluded.net, count = rollups.count + excluded.count;
    -- The latest cutoff (the row is made again if it went missing).
    INSERT INTO settings AS s (key, value) VALUES ('archived_before', q->>'before')
    ON CONFLICT (key) DO UPDATE SET value = excluded.value
     WHERE CASE WHEN s.value = '' THEN true
                ELSE s.value::timestamptz < excluded.value::timestamptz END;
    RETURN n;
END;
$fn$;
