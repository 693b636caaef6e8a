-- The witness's role table (spec 3): one row per mirroring session, changed
-- only by compare-and-set on the epoch, and a history of every change
-- (spec 12, 65) for dashboards and post-mortems.
CREATE TABLE IF NOT EXISTS role_table (
    session         TEXT PRIMARY KEY,
    principal       TEXT    NOT NULL,   -- partner name of the principal
    mirror          TEXT,               -- partner name of the mirror, once heard
    epoch           INTEGER NOT NULL,   -- mirroring_role_sequence
    safety          TEXT    NOT NULL,   -- 'full' or 'off'
    safety_sequence INTEGER NOT NULL,
    suspended       INTEGER NOT NULL,   -- is_suspended
    synchronized    INTEGER NOT NULL,   -- partner_sync_state: the principal waits for the mirror
    timeout_secs    INTEGER NOT NULL,
    failover_lsn    TEXT,
    updated_at_ms   INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS history (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    session       TEXT    NOT NULL,
    at_ms         INTEGER NOT NULL,     -- milliseconds since the Unix epoch
    event         TEXT    NOT NULL,     -- e.g. 'Automatic Failover', 'Principal Running Exposed'
    principal     TEXT    NOT NULL,
    epoch         INTEGER NOT NULL,
    synchronized  INTEGER NOT NULL,
    detail        TEXT
);

CREATE INDEX IF NOT EXISTS history_by_session ON history (session, at_ms);

-- This witness's identity, drawn once: partners compare it to tell whether
-- they report to the same witness through different addresses.
CREATE TABLE IF NOT EXISTS witness_identity (
    id INTEGER NOT NULL
);

-- Sessions whose principal moved to another witness (or none): nothing is
-- granted for them here until their principal records a sync state again.
CREATE TABLE IF NOT EXISTS detached_sessions (
    session TEXT PRIMARY KEY
);
