-- Holds on a team pool attributed to a member, and the member's total of counted holds.

ALTER TABLE holds ADD COLUMN member text;

CREATE TABLE reserved_by_member (
    kind text NOT NULL,
    account text NOT NULL,
    member text NOT NULL,
    amount bigint NOT NULL,
    PRIMARY KEY (kind, account, member)
);
