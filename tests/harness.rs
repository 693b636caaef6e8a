//! Self-tests of the harness every other integration test relies on: real
//! PostgreSQL instances, real kills and stops, and a link that can be cut.

mod common;

use std::time::Duration;

use common::pg::connect_port;
use common::{Link, PgInstance};
use tokio::time::timeout;

const SHORT: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(30);

async fn write_and_read(client: &tokio_postgres::Client, marker: &str) {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS notes (body text)")
        .await
        .expect("create table");
    client
        .execute("INSERT INTO notes VALUES ($1)", &[&marker])
        .await
        .expect("insert");
    let row = client
        .query_one("SELECT count(*) FROM notes WHERE body = $1", &[&marker])
        .await
        .expect("select");
    assert_eq!(row.get::<_, i64>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_run_side_by_side_and_take_real_faults() {
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(PgInstance::start),
        tokio::task::spawn_blocking(PgInstance::start)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    let (a_client, b_client) = (a.connect().await, b.connect().await);
    write_and_read(&a_client, "on a").await;
    write_and_read(&b_client, "on b").await;

    // kill -9: the open connection fails.
    a.kill9();
    let after_kill = timeout(LONG, a_client.simple_query("SELECT 1")).await;
    assert!(
        matches!(after_kill, Ok(Err(_))),
        "query on a killed server: {after_kill:?}"
    );
    assert!(
        connect_port(a.port()).await.is_err(),
        "new connection to a killed server"
    );

    // SIGSTOP: a query hangs; SIGCONT: the same query finishes.
    b.freeze();
    let b_client = std::sync::Arc::new(b_client);
    let pending = tokio::spawn({
        let b_client = b_client.clone();
        async move { b_client.query_one("SELECT 41 + 1", &[]).await }
    });
    tokio::time::sleep(SHORT).await;
    assert!(
        !pending.is_finished(),
        "a query on a stopped server answered"
    );
    b.thaw();
    let row = timeout(LONG, pending)
        .await
        .expect("query after SIGCONT")
        .unwrap();
    assert_eq!(row.expect("query result").get::<_, i32>(0), 42);

    // A black-holed link: a query times out; healed, queries work again.
    let link = Link::new(b.addr());
    let via_link = connect_port(link.port())
        .await
        .expect("connect through link");
    write_and_read(&via_link, "through link").await;
    link.black_hole();
    assert!(timeout(SHORT, via_link.simple_query("SELECT 1"))
        .await
        .is_err());
    assert!(
        timeout(SHORT, connect_port(link.port())).await.is_err(),
        "connect through a black hole"
    );
    link.heal();
    timeout(LONG, via_link.simple_query("SELECT 1"))
        .await
        .expect("query after heal")
        .expect("query result after heal");
    let fresh = connect_port(link.port()).await.expect("connect after heal");
    write_and_read(&fresh, "after heal").await;

    // A reset link: connections fail at once; healed, new ones work.
    link.reset();
    let reset = timeout(LONG, fresh.simple_query("SELECT 1"))
        .await
        .expect("reset is immediate");
    assert!(reset.is_err(), "query through a reset link succeeded");
    link.heal();
    write_and_read(
        &connect_port(link.port())
            .await
            .expect("connect after reset"),
        "again",
    )
    .await;

    // Dropping the handles leaves no server process and no directory behind.
    let b_pids = b.engine.processes();
    assert!(!b_pids.is_empty());
    let dirs = [a.dir().to_path_buf(), b.dir().to_path_buf()];
    drop((a, b));
    for pid in b_pids {
        assert!(
            nix::sys::signal::kill(pid, None).is_err() || is_zombie(pid.as_raw()),
            "postgres process {pid} left behind"
        );
    }
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

#[test]
fn a_panicking_test_still_stops_its_server_and_removes_its_dir() {
    let (sender, receiver) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let pg = PgInstance::start();
        sender
            .send((pg.pid().expect("running"), pg.dir().to_path_buf()))
            .unwrap();
        panic!("a failing test");
    })
    .join();
    assert!(outcome.is_err(), "the thread should have panicked");
    let (pid, dir) = receiver.recv().expect("instance started");
    assert!(nix::sys::signal::kill(pid, None).is_err() || is_zombie(pid.as_raw()));
    assert!(!dir.exists(), "{} left behind", dir.display());
}
