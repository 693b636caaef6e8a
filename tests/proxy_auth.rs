//! Proxy-side authentication on real PostgreSQL 15 (password_encryption =
//! scram-sha-256, pg_hba scram-sha-256 or md5 over TCP): SCRAM and md5
//! users from a userlist copied from pg_authid, verifiers fetched with an
//! auth query through a SECURITY DEFINER function (and a clear error
//! without it), psql with `channel_binding=require` over the proxy's TLS,
//! and a query sent along with the password, answered in transaction mode.
//! No client's plaintext password is in any config file.

mod common;

use common::proxy::{
    lookup_function, read_to_ready, run_client, server_with_users, standalone_config, tls_section,
    verifier_of, ProxyHandle,
};
use tokio_postgres::error::SqlState;

/// The server's log line for a failed password, which must never appear
/// when the proxy refused the client itself.
const SERVER_REFUSAL: &str = "password authentication failed";

/// Logs in through the proxy with tokio-postgres and returns current_user.
async fn login(
    proxy: &ProxyHandle,
    user: &str,
    password: &str,
) -> Result<String, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=postgres",
        proxy.port
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0))
}

/// Asserts PostgreSQL's refusal of a password: 28P01 and its message.
fn assert_refused(result: Result<String, tokio_postgres::Error>, user: &str) {
    let err = result.expect_err("a wrong password or unknown user was let in");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err}"));
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD, "{err}");
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(
        db.message(),
        format!("password authentication failed for user \"{user}\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userlist_scram_and_md5_users_log_in_and_bad_passwords_are_refused_by_the_proxy() {
    let (pg, setup) = server_with_users().await;
    let dir = tempfile::tempdir().unwrap();
    let userlist = dir.path().join("userlist.txt");
    let list = format!(
        "\"app\" \"{}\"\n\"old\" \"{}\"\n",
        verifier_of(&setup, "app").await,
        verifier_of(&setup, "old").await
    );
    std::fs::write(&userlist, &list).unwrap();
    let config = format!(
        "{}auth = \"userlist\"\nauth_file = {userlist:?}\n",
        standalone_config(&pg, "")
    );
    for text in [&config, &list] {
        assert!(
            !text.contains("wonder") && !text.contains("legacy"),
            "{text}"
        );
    }
    let proxy = ProxyHandle::start(&config).await;

    let (ok, out) = run_client(
        "psql",
        &[
            "-X",
            "-At",
            "-c",
            "SELECT current_user",
            &proxy.conninfo("app", "postgres"),
        ],
        &[("PGPASSWORD", "wonder")],
    );
    assert!(ok && out.trim() == "app", "psql as app: {out}");
    assert_eq!(login(&proxy, "old", "legacy").await.unwrap(), "old");

    // Refused by the proxy itself: the server never sees these attempts.
    assert_refused(login(&proxy, "app", "wrong").await, "app");
    assert_refused(login(&proxy, "old", "wrong").await, "old");
    assert_refused(login(&proxy, "ghost", "wonder").await, "ghost");
    let log = pg.engine.log_tail(500);
    assert!(
        !log.contains(SERVER_REFUSAL),
        "the server saw a refused login:\n{log}"
    );

    // The server's verifier changed: the client passes the proxy, the
    // server refuses the proxy's proof, and the client gets its error.
    setup
        .batch_execute("ALTER USER app PASSWORD 'changed'")
        .await
        .unwrap();
    assert_refused(login(&proxy, "app", "wonder").await, "app");
    let log = pg.engine.log_tail(500);
    assert!(
        log.contains(SERVER_REFUSAL),
        "the server did not refuse:\n{log}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_fetches_verifiers_and_a_missing_function_is_a_clear_error() {
    let (pg, setup) = server_with_users().await;
    setup.batch_execute(&lookup_function()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Only auth_user's password: no verifier of any client is configured.
    let userlist = dir.path().join("userlist.txt");
    std::fs::write(&userlist, "\"pgmirror_auth\" \"lookup-only\"\n").unwrap();
    let config = format!(
        "{}auth = \"query\"\nauth_user = \"pgmirror_auth\"\nauth_file = {userlist:?}\n",
        standalone_config(&pg, "")
    );
    let proxy = ProxyHandle::start(&config).await;
    assert_eq!(login(&proxy, "app", "wonder").await.unwrap(), "app");
    assert_eq!(login(&proxy, "old", "legacy").await.unwrap(), "old");
    assert_refused(login(&proxy, "app", "wrong").await, "app");
    assert_refused(login(&proxy, "ghost", "wonder").await, "ghost");
    proxy.stop().await;

    // Without the function (a fresh proxy: nothing cached).
    setup
        .batch_execute("DROP FUNCTION pgmirror_auth.user_lookup(text)")
        .await
        .unwrap();
    let proxy = ProxyHandle::start(&config).await;
    let err = login(&proxy, "app", "wonder")
        .await
        .expect_err("logged in without the auth query");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code(), &SqlState::PROTOCOL_VIOLATION, "{err}");
    assert!(
        db.message().starts_with(
            "pgmirror proxy: auth_query failed (unexpected response from login query)"
        ) && db.message().contains("pgmirror_auth.user_lookup"),
        "{}",
        db.message()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_with_channel_binding_required_logs_in_through_the_proxys_tls() {
    let (pg, setup) = server_with_users().await;
    let dir = tempfile::tempdir().unwrap();
    let userlist = dir.path().join("userlist.txt");
    let list = format!("\"app\" \"{}\"\n", verifier_of(&setup, "app").await);
    std::fs::write(&userlist, list).unwrap();
    let config = format!(
        "{}auth = \"userlist\"\nauth_file = {userlist:?}\n",
        standalone_config(&pg, &tls_section(dir.path()))
    );
    let proxy = ProxyHandle::start(&config).await;
    let psql = |extra: &str, password: &str| {
        run_client(
            "psql",
            &[
                "-X",
                "-At",
                "-c",
                "SELECT current_user",
                &format!("{} {extra}", proxy.conninfo("app", "postgres")),
            ],
            &[("PGPASSWORD", password)],
        )
    };
    let (ok, out) = psql("sslmode=require channel_binding=require", "wonder");
    assert!(
        ok && out.trim() == "app",
        "psql with channel binding: {out}"
    );
    let (ok, out) = psql("sslmode=require channel_binding=require", "wrong");
    assert!(
        !ok && out.contains("password authentication failed for user \"app\""),
        "{out}"
    );
    // Without TLS there is nothing to bind to, and libpq refuses.
    let (ok, out) = psql("sslmode=disable channel_binding=require", "wonder");
    assert!(!ok && out.contains("channel binding"), "{out}");
    proxy.stop().await;
}

/// A client may send its first query in the same packet as its password,
/// before the server's AuthenticationOk, as PostgreSQL and PgBouncer
/// allow: the proxy reads the login ahead and must hand on what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_sent_with_the_password_is_answered_in_transaction_mode() {
    use pgmirror::proxy::auth::md5::Md5Verifier;
    use pgmirror::wire::startup::startup_message;
    use pgmirror::wire::{auth::password_message, extended::encode_query};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (pg, setup) = server_with_users().await;
    let dir = tempfile::tempdir().unwrap();
    let userlist = dir.path().join("userlist.txt");
    let verifier = verifier_of(&setup, "old").await;
    std::fs::write(&userlist, format!("\"old\" \"{verifier}\"\n")).unwrap();
    let config = format!(
        "{}auth = \"userlist\"\nauth_file = {userlist:?}\npool_mode = \"transaction\"\n",
        standalone_config(&pg, "")
    );
    let proxy = ProxyHandle::start(&config).await;

    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let startup = startup_message(&[("user", "old"), ("database", "postgres")]);
    client.write_all(&startup).await.unwrap();
    let mut request = [0u8; 13];
    client.read_exact(&mut request).await.unwrap();
    assert_eq!(&request[..9], b"R\0\0\0\x0c\0\0\0\x05", "an md5 request");
    let salt: [u8; 4] = request[9..].try_into().unwrap();
    let answer = verifier.parse::<Md5Verifier>().unwrap().answer(salt);
    let mut both = password_message(&answer);
    both.extend_from_slice(&encode_query("SELECT current_user::text"));
    client.write_all(&both).await.unwrap();

    let login = read_to_ready(&mut client).await;
    assert_eq!(login.first().map(|(tag, _)| *tag), Some(b'R'), "{login:?}");
    let answered = read_to_ready(&mut client).await;
    let row = answered
        .iter()
        .find(|(tag, _)| *tag == b'D')
        .unwrap_or_else(|| panic!("no row: {answered:?}"));
    assert!(row.1.ends_with(b"old"), "{row:?}");
    proxy.stop().await;
}
