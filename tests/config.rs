//! Configuration files as a user writes them: the shipped examples load, and
//! mistakes are refused with the file, the key and the problem named, both by
//! the library and by the `pgmirror` binary.

mod common;

use std::path::Path;

use common::process::run;
use pgmirror::config::{self, PartnerConfig, ProxyConfig, WitnessConfig};
use pgmirror::roles::{Role, Safety};

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/examples")
        .join(name)
}

#[test]
fn shipped_examples_load() {
    let alpha: PartnerConfig = config::load(&example("partner-alpha.toml")).unwrap();
    let beta: PartnerConfig = config::load(&example("partner-beta.toml")).unwrap();
    assert_eq!(
        (alpha.initial_role, beta.initial_role),
        (Role::Principal, Role::Mirror)
    );
    assert_eq!(alpha.session, beta.session);
    assert_eq!(alpha.peer.host, "beta.example");
    assert_eq!(beta.peer.host, "alpha.example");
    assert_eq!(alpha.safety, Safety::Full);
    assert_eq!(alpha.health.map(|addr| addr.0.port()), Some(8008));
    assert_eq!((alpha.threads, beta.threads), (1, 1));
    let witness: WitnessConfig = config::load(&example("witness.toml")).unwrap();
    assert!(witness.store.ends_with("witness.sqlite"));
    let proxy: ProxyConfig = config::load(&example("proxy.toml")).unwrap();
    assert_eq!(proxy.sessions["shop"].partners.len(), 2);
}

fn write_variant(dir: &Path, example_name: &str, from: &str, to: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(example(example_name)).unwrap();
    assert!(text.contains(from), "{example_name} has no {from:?}");
    let path = dir.join(example_name);
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    path
}

#[test]
fn wrong_type_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_variant(
        dir.path(),
        "partner-alpha.toml",
        "port = 5432",
        "port = \"5432\"",
    );
    let err = config::load::<PartnerConfig>(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}: postgres.port: invalid type", path.display())),
        "{err}"
    );
    assert!(err.contains("line "), "{err}");
}

#[test]
fn unknown_key_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_variant(dir.path(), "proxy.toml", "max_clients =", "max_client =");
    let err = config::load::<ProxyConfig>(&path).unwrap_err().to_string();
    assert!(err.starts_with(&path.display().to_string()), "{err}");
    assert!(
        err.contains(": max_client: unknown field `max_client`"),
        "{err}"
    );
    let path = write_variant(
        dir.path(),
        "partner-beta.toml",
        "[tls]\n",
        "[tls]\nciphers = \"all\"\n",
    );
    let err = config::load::<PartnerConfig>(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(": tls.ciphers: unknown field `ciphers`"),
        "{err}"
    );
}

#[test]
fn out_of_range_values_are_refused_with_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let partner_error = |from: &str, to: &str| {
        let path = write_variant(dir.path(), "partner-alpha.toml", from, to);
        config::load::<PartnerConfig>(&path)
            .unwrap_err()
            .to_string()
    };
    let err = partner_error("timeout = 10", "timeout = 0");
    assert!(
        err.ends_with("timeout: 0 is out of range (1 to 3600 seconds)"),
        "{err}"
    );
    let err = partner_error("threads = 1", "threads = 0");
    assert!(
        err.ends_with("threads: must be 1 to 1024 (1, the default, suits most machines)"),
        "{err}"
    );
    let err = partner_error("health = \"0.0.0.0:8008\"", "health = \"0.0.0.0:9187\"");
    assert!(
        err.ends_with("health: 0.0.0.0:9187 is also the metrics address"),
        "{err}"
    );
    let path = write_variant(
        dir.path(),
        "witness.toml",
        "ca = \"/etc/pgmirror/ca.crt\"\n",
        "",
    );
    let err = config::load::<WitnessConfig>(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls.ca: missing"), "{err}");
}

#[test]
fn the_binary_refuses_a_bad_config_before_doing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_variant(dir.path(), "proxy.toml", "0.0.0.0:6432", "127.0.0.1:99999");
    let (code, output) = run(&["proxy", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(&format!(
            "{}: listen: \"127.0.0.1:99999\" is not a valid address",
            path.display()
        )),
        "{output}"
    );
    let (code, output) = run(&["witness", "--config", "/nonexistent/witness.toml"]);
    assert_eq!(code, Some(1));
    assert!(
        output.contains("/nonexistent/witness.toml: cannot read"),
        "{output}"
    );
}

#[test]
fn help_describes_every_subcommand() {
    let (code, output) = run(&["--help"]);
    assert_eq!(code, Some(0));
    for subcommand in ["partner", "witness", "proxy", "demo"] {
        assert!(
            output.contains(subcommand),
            "--help lacks {subcommand}: {output}"
        );
        let (code, help) = run(&[subcommand, "--help"]);
        assert_eq!(code, Some(0), "{help}");
        assert!(help.contains("Usage: pgmirror"), "{help}");
    }
}
