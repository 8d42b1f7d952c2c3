-- Holds on a team pool attributed to a member, and the member's total of counted holds.

ALTER TABLE holds ADD COLUMN member TEXT;

CREATE TABLE reserved_by_member (
    kind TEXT NOT NULL,
    account TEXT NOT NULL,
    member TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (kind, account, member)
) WITHOUT ROWID;
