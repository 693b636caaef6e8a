-- The history view's status samples (issue 12): one partner's role, state
-- and monitoring figures (spec 63) at one time, kept for the retention
-- (`history_retention_days`). The witness keeps them beside its role
-- table; an agent without a witness in `history.sqlite` in its state
-- directory.
CREATE TABLE IF NOT EXISTS samples (
    at_ms                     INTEGER NOT NULL,  -- milliseconds since the Unix epoch
    session                   TEXT    NOT NULL,
    name                      TEXT    NOT NULL,  -- the partner's server name
    role                      TEXT    NOT NULL,  -- 'PRINCIPAL' or 'MIRROR'
    state                     TEXT    NOT NULL,  -- mirroring_state_desc
    epoch                     INTEGER NOT NULL,  -- mirroring_role_sequence
    safety                    TEXT    NOT NULL,  -- 'FULL' or 'OFF'
    send_queue_bytes          INTEGER,
    redo_queue_bytes          INTEGER,
    send_rate_bytes_per_sec   REAL,
    redo_rate_bytes_per_sec   REAL,
    mirror_commit_overhead_ms REAL
);

CREATE INDEX IF NOT EXISTS samples_by_time ON samples (at_ms);
