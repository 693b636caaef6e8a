//! Mirroring sessions without a witness, on real PostgreSQL: setup, the
//! safety levels, pause and resume, manual failover, forced service and the
//! refusals of commands in the wrong state.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Pair, PairOptions, Partner, SLOW};
use pgmirror::control::{Command, ControlError};
use pgmirror::partner::engine::PgBinaries;
use pgmirror::roles::Safety;

async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_synchronizes_and_ships_rows() {
    let pair = Pair::start(PairOptions::default());
    let mut seen = Vec::new();
    let deadline = Instant::now() + SLOW;
    loop {
        let status = pair.status(&pair.a).await;
        if let Some(state) = status.state() {
            if seen.last().map(String::as_str) != Some(state) {
                seen.push(state.to_string());
            }
            if state == "SYNCHRONIZED" {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never synchronized: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("principal states during setup: {seen:?}");
    assert!(
        seen.iter().any(|state| state == "SYNCHRONIZING"),
        "{seen:?}"
    );
    pair.wait_state("SYNCHRONIZED").await;

    let principal = pair.a.sql().await;
    principal
        .batch_execute("CREATE TABLE items (id int primary key, body text)")
        .await
        .unwrap();
    for batch in 0..100 {
        principal
            .execute(
                "INSERT INTO items SELECT g, md5(g::text) FROM generate_series($1::int, $1::int + 99) g",
                &[&(batch * 100)],
            )
            .await
            .unwrap();
    }
    let mirror = pair.b.sql().await;
    let deadline = Instant::now() + SLOW;
    while count(&mirror, "items").await != 10_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "rows never reached the mirror"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = pair.status(&pair.b).await;
    assert_eq!(status.mirroring_role_desc.as_deref(), Some("MIRROR"));
    let principal_status = pair.status(&pair.a).await;
    assert_eq!(
        principal_status.mirroring_partner_name.as_deref(),
        Some("beta")
    );
    assert!(principal_status.link_bytes_compressed > 0);
}

fn done(answer: Result<String, ControlError>) -> String {
    match answer {
        Ok(message) => message,
        other => panic!("command not carried out: {other:?}"),
    }
}

fn refused(answer: Result<String, ControlError>) -> String {
    match answer {
        Err(ControlError::Refused(reason)) => reason,
        other => panic!("command not refused: {other:?}"),
    }
}

async fn wait_rows(partner: &Partner, table: &str, expected: i64) {
    let client = partner.sql().await;
    let deadline = Instant::now() + SLOW;
    loop {
        let rows = count(&client, table).await;
        if rows == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {rows} rows in {table}, not {expected}",
            partner.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn table_contents(partner: &Partner, table: &str) -> Vec<String> {
    let client = partner.sql().await;
    client
        .query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[])
        .await
        .expect("read table")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn synchronized_pair(options: PairOptions) -> Pair {
    let pair = Pair::start(options);
    pair.wait_state("SYNCHRONIZED").await;
    pair
}

/// Writers committing single-row inserts on `port` until they fail; the ids
/// whose COMMIT was acknowledged are collected.
fn start_writers(
    port: u16,
    first_id: i32,
    writers: i32,
    acknowledged: Arc<Mutex<Vec<i32>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|writer| {
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                let Ok(client) = common::pg::connect_port(port).await else {
                    return;
                };
                for sequence in 0.. {
                    let id = first_id + writer * 1_000_000 + sequence;
                    if client
                        .execute("INSERT INTO acks VALUES ($1)", &[&id])
                        .await
                        .is_err()
                    {
                        return;
                    }
                    acknowledged.lock().unwrap().push(id);
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_full_every_acknowledged_commit_survives_a_crash_and_forced_service() {
    let mut pair = synchronized_pair(PairOptions::default()).await;
    pair.a
        .sql()
        .await
        .batch_execute("CREATE TABLE acks (id int primary key)")
        .await
        .unwrap();
    let mut principal_is_a = true;
    for round in 1..=20 {
        let (principal, mirror) = if principal_is_a {
            (&mut pair.a, &mut pair.b)
        } else {
            (&mut pair.b, &mut pair.a)
        };
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let writers = start_writers(
            principal.pg_port(),
            round * 10_000_000,
            4,
            acknowledged.clone(),
        );
        let deadline = Instant::now() + SLOW;
        while acknowledged.lock().unwrap().len() < 200 {
            assert!(
                Instant::now() < deadline,
                "round {round}: writes never got going"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        principal.kill9();
        for writer in writers {
            writer.await.unwrap();
        }
        let acknowledged = acknowledged.lock().unwrap().clone();
        // Re-borrow through the pair for its helpers.
        let (principal_name, mirror_name) = (principal.name.clone(), mirror.name.clone());
        let (principal, mirror) = if principal_is_a {
            (&pair.a, &pair.b)
        } else {
            (&pair.b, &pair.a)
        };
        pair.wait_for(mirror, "disconnected from its principal", SLOW, |status| {
            !status.peer_connected
        })
        .await;
        let message = done(
            pair.command(mirror, Command::ForceServiceAllowDataLoss)
                .await,
        );
        assert!(message.contains("SUSPENDED"), "{message}");
        let present: std::collections::HashSet<i32> = mirror
            .sql()
            .await
            .query("SELECT id FROM acks", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let lost: Vec<&i32> = acknowledged
            .iter()
            .filter(|id| !present.contains(id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged commits lost on {mirror_name}: {lost:?}",
            lost.len()
        );
        println!(
            "round {round}: {} acknowledged commits, all on {mirror_name} after forced service",
            acknowledged.len()
        );
        let _ = principal;

        // The old principal returns as a suspended mirror; RESUME rewinds it.
        let old = if principal_is_a {
            &mut pair.a
        } else {
            &mut pair.b
        };
        old.start_agent();
        let old = if principal_is_a { &pair.a } else { &pair.b };
        pair.wait_for(old, "a suspended mirror", SLOW, |status| {
            status.mirroring_role_desc.as_deref() == Some("MIRROR")
                && status.state() == Some("SUSPENDED")
        })
        .await;
        let new = if principal_is_a { &pair.b } else { &pair.a };
        done(pair.command(new, Command::Resume).await);
        pair.wait_state("SYNCHRONIZED").await;
        let _ = principal_name;
        principal_is_a = !principal_is_a;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_off_commits_do_not_wait_for_a_black_holed_mirror() {
    let pair = Pair::start(PairOptions {
        safety: Safety::Off,
        links: true,
        ..PairOptions::default()
    });
    pair.wait_state("UNSYNCHRONIZED").await;
    let principal = pair.a.sql().await;
    principal
        .batch_execute("CREATE TABLE notes (id int)")
        .await
        .unwrap();
    pair.cut_partners();
    let started = Instant::now();
    for id in 0..200 {
        principal
            .execute("INSERT INTO notes VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    let elapsed = started.elapsed();
    println!("200 commits with the mirror black-holed under SAFETY OFF: {elapsed:?}");
    // TIMEOUT is 10 s: a commit that waited for the mirror would take that long.
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    pair.heal_partners();
    wait_rows(&pair.b, "notes", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_keeps_wal_in_the_slot_and_resume_drains_it() {
    let pair = synchronized_pair(PairOptions::default()).await;
    let principal = pair.a.sql().await;
    principal
        .batch_execute("CREATE TABLE bulk (id int, body text)")
        .await
        .unwrap();
    wait_rows(&pair.b, "bulk", 0).await;
    let message = done(pair.command(&pair.b, Command::Suspend).await);
    assert!(message.contains("SUSPENDED"), "{message}");
    pair.wait_state("SUSPENDED").await;
    let before = pair
        .status(&pair.a)
        .await
        .send_queue_bytes
        .expect("send queue");
    principal
        .batch_execute(
            "INSERT INTO bulk SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g",
        )
        .await
        .expect("a suspended principal keeps serving (spec 45)");
    let status = pair
        .wait_for(&pair.a, "a grown send queue", SLOW, |status| {
            status
                .send_queue_bytes
                .is_some_and(|queue| queue > before + 5_000_000)
        })
        .await;
    let retained: i64 = principal
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots \
             WHERE slot_name = 'pgmirror_shop'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    println!(
        "suspended: send queue {} bytes, slot retains {retained} bytes",
        status.send_queue_bytes.unwrap()
    );
    assert!(retained as u64 >= status.send_queue_bytes.unwrap());
    assert_eq!(
        count(&pair.b.sql().await, "bulk").await,
        0,
        "WAL moved while suspended"
    );

    assert!(refused(pair.command(&pair.b, Command::Resume).await).contains("principal"));
    done(pair.command(&pair.a, Command::Resume).await);
    pair.wait_for(&pair.a, "drained", SLOW, |status| {
        status.send_queue_bytes == Some(0) && status.state() == Some("SYNCHRONIZED")
    })
    .await;
    wait_rows(&pair.b, "bulk", 50_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_twice_returns_the_roles_and_loses_nothing() {
    let pair = synchronized_pair(PairOptions::default()).await;
    pair.a
        .sql()
        .await
        .batch_execute("CREATE TABLE ledger (id int primary key)")
        .await
        .unwrap();
    let start_sequence = pair.status(&pair.a).await.mirroring_role_sequence.unwrap();
    let mut written = 0;
    for (from, to) in [(&pair.a, &pair.b), (&pair.b, &pair.a)] {
        let client = from.sql().await;
        for _ in 0..500 {
            written += 1;
            client
                .execute("INSERT INTO ledger VALUES ($1)", &[&written])
                .await
                .unwrap();
        }
        pair.wait_state("SYNCHRONIZED").await;
        let started = Instant::now();
        let message = done(pair.command(from, Command::Failover).await);
        let writable = to.sql().await;
        writable
            .execute("INSERT INTO ledger VALUES ($1)", &[&-written])
            .await
            .expect("write on the new principal");
        println!(
            "FAILOVER {} -> {}: writes accepted after {:?} ({message})",
            from.name,
            to.name,
            started.elapsed()
        );
        assert!(
            client.simple_query("SELECT 1").await.is_err(),
            "the old principal kept its session"
        );
        let status = pair.status(to).await;
        assert_eq!(status.mirroring_role_desc.as_deref(), Some("PRINCIPAL"));
        pair.wait_for(from, "the mirror", SLOW, |status| {
            status.mirroring_role_desc.as_deref() == Some("MIRROR")
        })
        .await;
        pair.wait_state("SYNCHRONIZED").await;
    }
    let status = pair.status(&pair.a).await;
    assert_eq!(status.mirroring_role_desc.as_deref(), Some("PRINCIPAL"));
    assert_eq!(status.mirroring_role_sequence, Some(start_sequence + 2));
    wait_rows(&pair.b, "ledger", 1002).await;
    assert_eq!(
        table_contents(&pair.a, "ledger").await,
        table_contents(&pair.b, "ledger").await
    );
}

/// Alpha, suspended, commits rows beta never gets and dies; beta is forced
/// into service and commits rows of its own. Returns when alpha's agent is
/// back as a suspended mirror.
async fn force_service_over_a_diverged_alpha(pair: &mut Pair) {
    let principal = pair.a.sql().await;
    principal.batch_execute("CREATE TABLE orders (id int primary key, origin text); INSERT INTO orders SELECT g, 'both' FROM generate_series(1, 100) g").await.unwrap();
    wait_rows(&pair.b, "orders", 100).await;
    done(pair.command(&pair.a, Command::Suspend).await);
    principal
        .batch_execute("INSERT INTO orders SELECT g, 'alpha only' FROM generate_series(101, 150) g")
        .await
        .unwrap();
    pair.a.kill9();
    pair.wait_for(&pair.b, "disconnected", SLOW, |status| {
        !status.peer_connected
    })
    .await;
    done(
        pair.command(&pair.b, Command::ForceServiceAllowDataLoss)
            .await,
    );
    let status = pair.status(&pair.b).await;
    assert_eq!(status.mirroring_role_desc.as_deref(), Some("PRINCIPAL"));
    assert_eq!(status.state(), Some("SUSPENDED"));
    pair.b
        .sql()
        .await
        .batch_execute("INSERT INTO orders SELECT g, 'beta only' FROM generate_series(151, 170) g")
        .await
        .unwrap();

    pair.a.start_agent();
    pair.wait_for(&pair.a, "a suspended mirror", SLOW, |status| {
        status.mirroring_role_desc.as_deref() == Some("MIRROR")
            && status.state() == Some("SUSPENDED")
    })
    .await;
}

/// After RESUME: alpha replays what beta commits and holds exactly beta's
/// rows, none of its own unsent ones.
async fn alpha_follows_beta(pair: &Pair) {
    pair.wait_state("SYNCHRONIZED").await;
    pair.b
        .sql()
        .await
        .batch_execute(
            "INSERT INTO orders SELECT g, 'after resume' FROM generate_series(171, 180) g",
        )
        .await
        .unwrap();
    wait_rows(&pair.a, "orders", 130).await;
    let alpha = table_contents(&pair.a, "orders").await;
    assert!(
        !alpha.iter().any(|row| row.contains("alpha only")),
        "the old principal kept its unsent rows"
    );
    assert_eq!(alpha, table_contents(&pair.b, "orders").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_service_then_resume_rewinds_the_old_principal() {
    let mut pair = synchronized_pair(PairOptions::default()).await;
    force_service_over_a_diverged_alpha(&mut pair).await;
    assert!(
        pair.a.engine.postmaster_pid().is_none(),
        "a diverged copy came online before RESUME"
    );
    done(pair.command(&pair.b, Command::Resume).await);
    alpha_follows_beta(&pair).await;
}

/// A copy of PostgreSQL's bin directory in `dir`/bin in which `program`
/// is a shell script: `body`, run with `$REAL` naming the real program and
/// `$MARKER` the file `dir`/marker, which the script creates (as
/// PostgreSQL's user) to tell the test it got where the test waits for.
fn bin_dir_wrapping(dir: &Path, program: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let real = PgBinaries::locate(None).expect("PostgreSQL binaries").dir;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    for entry in std::fs::read_dir(&real).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != program {
            std::os::unix::fs::symlink(entry.path(), bin.join(entry.file_name())).unwrap();
        }
    }
    let script = format!(
        "#!/bin/sh\nREAL={:?}\nMARKER={:?}\n{body}",
        real.join(program),
        dir.join("marker")
    );
    std::fs::write(bin.join(program), script).unwrap();
    std::fs::set_permissions(bin.join(program), std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Waits until the script of [`bin_dir_wrapping`] created its marker.
async fn wait_for_marker(dir: &Path, what: &str) {
    let deadline = Instant::now() + SLOW;
    while !dir.join("marker").exists() {
        assert!(Instant::now() < deadline, "{what} never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// pg_rewind that, the first time, rewinds and then hangs: the agent can
/// be killed between pg_rewind's end and its record of it.
const PG_REWIND_THAT_HANGS_ONCE: &str = "\"$REAL\" \"$@\"\nstatus=$?\n\
    if [ ! -e \"$MARKER\" ]; then touch \"$MARKER\"; sleep 600; fi\nexit $status\n";

/// I1: an agent killed after pg_rewind replaced its copy's control file,
/// before it recorded the rewind as done, never runs pg_rewind on that copy
/// again (a rerun crash-recovers it onto the new principal's timeline and
/// then finds nothing to rewind while the copy's WAL still diverges): the
/// copy is set aside and cloned afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_inside_pg_rewind_sets_the_copy_aside_and_clones_afresh() {
    let tools = tempfile::tempdir().unwrap();
    let mut pair = synchronized_pair(PairOptions {
        bin_dir: Some(bin_dir_wrapping(
            tools.path(),
            "pg_rewind",
            PG_REWIND_THAT_HANGS_ONCE,
        )),
        ..PairOptions::default()
    })
    .await;
    force_service_over_a_diverged_alpha(&mut pair).await;
    done(pair.command(&pair.b, Command::Resume).await);
    wait_for_marker(tools.path(), "pg_rewind").await;
    pair.a.kill9();
    pair.a.start_agent();
    alpha_follows_beta(&pair).await;
    let data_dir = &pair.a.config.postgres.data_dir;
    let kept_aside = std::fs::read_dir(data_dir.parent().unwrap())
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("data.diverged-")
        })
        .count();
    assert_eq!(kept_aside, 1, "the interrupted copy was not kept aside");
}

/// pg_basebackup that, the first time, copies at 32 kB/s and tells the test
/// after two seconds, so that the agent is killed with half a copy.
const PG_BASEBACKUP_SLOW_ONCE: &str = "if [ -e \"$MARKER\" ]; then exec \"$REAL\" \"$@\"; fi\n\
    \"$REAL\" --max-rate=32k \"$@\" &\nsleep 2\ntouch \"$MARKER\"\nwait\n";

/// I1: a base backup cut short by a kill -9 of the mirror's agent is never
/// adopted as a copy: the restarted agent removes it and takes a new one,
/// and the mirror then replays what the principal commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_during_its_base_backup_takes_a_new_one() {
    let tools = tempfile::tempdir().unwrap();
    let mut pair = Pair::start(PairOptions {
        bin_dir: Some(bin_dir_wrapping(
            tools.path(),
            "pg_basebackup",
            PG_BASEBACKUP_SLOW_ONCE,
        )),
        ..PairOptions::default()
    });
    wait_for_marker(tools.path(), "pg_basebackup").await;
    pair.b.kill9();
    let data_dir = &pair.b.config.postgres.data_dir;
    assert!(
        data_dir.join("PG_VERSION").exists() && !data_dir.join("global/pg_control").exists(),
        "the test meant to leave half a copy, not {:?}",
        std::fs::read_dir(data_dir).map(|dir| dir.count())
    );
    pair.b.start_agent();
    pair.wait_state("SYNCHRONIZED").await;
    pair.a
        .sql()
        .await
        .batch_execute("CREATE TABLE after_copy AS SELECT g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    wait_rows(&pair.b, "after_copy", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_in_the_wrong_state_are_refused_with_their_reason() {
    let pair = synchronized_pair(PairOptions::default()).await;
    let reason = refused(pair.command(&pair.b, Command::Failover).await);
    assert!(
        reason.contains("must be issued on the principal"),
        "{reason}"
    );
    let reason = refused(
        pair.command(&pair.b, Command::ForceServiceAllowDataLoss)
            .await,
    );
    assert!(reason.contains("principal is still connected"), "{reason}");
    let reason = refused(
        pair.command(&pair.a, Command::ForceServiceAllowDataLoss)
            .await,
    );
    assert!(reason.contains("issued on the mirror"), "{reason}");
    done(pair.command(&pair.a, Command::Suspend).await);
    let reason = refused(pair.command(&pair.a, Command::Failover).await);
    assert!(reason.contains("SUSPENDED"), "{reason}");
    done(pair.command(&pair.a, Command::Resume).await);
    // Right after RESUME the mirror reconnects (DISCONNECTED) or catches
    // up (SYNCHRONIZING): either way, not yet SYNCHRONIZED.
    let reason = refused(pair.command(&pair.a, Command::Failover).await);
    assert!(
        (reason.contains("SYNCHRONIZING") || reason.contains("DISCONNECTED"))
            && reason.contains("needs SYNCHRONIZED"),
        "{reason}"
    );
    let reason = refused(pair.command(&pair.a, Command::Timeout(0)).await);
    assert!(reason.contains("out of range"), "{reason}");
    pair.wait_state("SYNCHRONIZED").await;
    done(pair.command(&pair.a, Command::Safety(Safety::Off)).await);
    let reason = refused(pair.command(&pair.a, Command::Failover).await);
    assert!(reason.contains("SAFETY FULL"), "{reason}");
    let status = pair.status(&pair.a).await;
    assert_eq!(status.mirroring_safety_sequence, Some(2));
    done(pair.command(&pair.a, Command::Timeout(3)).await);
    pair.wait_for(&pair.b, "the principal's timeout", SLOW, |status| {
        status.mirroring_connection_timeout == Some(3)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_off_ends_the_session_on_both() {
    let pair = synchronized_pair(PairOptions::default()).await;
    done(pair.command(&pair.b, Command::Off).await);
    for partner in [&pair.a, &pair.b] {
        pair.wait_for(partner, "without mirroring", SLOW, |status| {
            status.mirroring_state.is_none()
        })
        .await;
    }
    let principal = pair.a.sql().await;
    tokio::time::timeout(
        Duration::from_secs(10),
        principal.batch_execute("CREATE TABLE after_off (id int)"),
    )
    .await
    .expect("commits do not wait once mirroring is off")
    .unwrap();
    let reason = refused(pair.command(&pair.a, Command::Failover).await);
    assert!(reason.contains("mirroring is off"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_compression_on_pgbench_wal() {
    let pair = synchronized_pair(PairOptions::default()).await;
    let principal = pair.a.sql().await;
    let start = common::pg::current_lsn(&principal).await;
    let before = pair.status(&pair.a).await;
    let port = pair.a.pg_port().to_string();
    for args in [
        vec!["-i", "-q", "-s", "5"],
        vec!["-c", "4", "-j", "2", "-T", "5"],
    ] {
        let output = std::process::Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(&args)
            .arg("postgres")
            .output()
            .expect("run pgbench");
        assert!(
            output.status.success(),
            "pgbench {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let end = common::pg::current_lsn(&principal).await;
    pair.wait_for(&pair.a, "caught up", SLOW, |status| {
        status.send_queue_bytes == Some(0)
    })
    .await;
    let after = pair.status(&pair.a).await;
    let wal = end.bytes_since(start);
    let raw = after.link_bytes_raw - before.link_bytes_raw;
    let compressed = after.link_bytes_compressed - before.link_bytes_compressed;
    println!(
        "pgbench WAL {wal} bytes; link raw {raw} bytes, compressed {compressed} bytes; \
         compression ratio {:.3}; link bytes / WAL bytes {:.3}",
        compressed as f64 / raw as f64,
        compressed as f64 / wal as f64
    );
    assert!(raw >= wal, "the link carried less than the WAL");
    assert!(
        compressed < raw / 2,
        "compression saved little: {compressed} of {raw}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_full_a_lost_mirror_holds_commits_for_timeout_then_the_principal_runs_exposed() {
    let pair = Pair::start(PairOptions {
        timeout: 3,
        links: true,
        ..PairOptions::default()
    });
    pair.wait_state("SYNCHRONIZED").await;
    let principal = pair.a.sql().await;
    principal
        .batch_execute("CREATE TABLE held (id int)")
        .await
        .unwrap();
    pair.cut_partners();
    let started = Instant::now();
    principal
        .execute("INSERT INTO held VALUES (1)", &[])
        .await
        .unwrap();
    let held = started.elapsed();
    println!(
        "a commit with the mirror black-holed under FULL returned after {held:?} (TIMEOUT 3 s)"
    );
    // The commit waited for the mirror until the principal gave up on it.
    assert!(held >= Duration::from_secs(2), "{held:?}");
    assert!(held < Duration::from_secs(30), "{held:?}");
    let status = pair.status(&pair.a).await;
    assert_eq!(status.state(), Some("DISCONNECTED"));
    let quick = Instant::now();
    principal
        .execute("INSERT INTO held VALUES (2)", &[])
        .await
        .unwrap();
    assert!(
        quick.elapsed() < Duration::from_secs(2),
        "exposed commits still wait"
    );
    pair.heal_partners();
    pair.wait_state("SYNCHRONIZED").await;
    let names: String = principal
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        names, "\"beta\"",
        "back to synchronous commit once SYNCHRONIZED"
    );
    wait_rows(&pair.b, "held", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_holding_another_database_is_refused() {
    let pair = Pair::start(PairOptions {
        foreign_mirror: true,
        ..PairOptions::default()
    });
    let status = pair
        .wait_for(&pair.b, "refusing the principal", SLOW, |status| {
            status
                .last_error
                .as_deref()
                .is_some_and(|error| error.contains("system identifier"))
        })
        .await;
    println!("{}", status.last_error.unwrap());
    assert_ne!(pair.status(&pair.a).await.state(), Some("SYNCHRONIZED"));
}
