-- Idempotency keys move to an ordinary (rowid) table. Each row carries a stored result of a
-- few hundred bytes; in a WITHOUT ROWID table those bytes live in the primary-key b-tree
-- itself, so few keys fit a page and every insert rewrites more of the tree. The key stays
-- unique through the primary key's own index.

CREATE TABLE idempotency_new (
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    op TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (kind, account, op, key)
);
INSERT INTO idempotency_new (kind, account, op, key, fingerprint, result)
    SELECT kind, account, op, key, fingerprint, result FROM idempotency;
DROP TABLE idempotency;
ALTER TABLE idempotency_new RENAME TO idempotency;
