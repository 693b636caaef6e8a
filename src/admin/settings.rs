//! The run-time settings the console reports as PostgreSQL would, for
//! `SHOW <name>`, `current_setting()` and the ParameterStatus messages at
//! login: clients and drivers ask for these to decide how to talk.

/// The console's database name.
pub const DATABASE: &str = "pgmirror";

/// The PostgreSQL version the console speaks as (its SQL is PostgreSQL's
/// dialect; drivers read this to pick features).
pub const SERVER_VERSION: &str = "15.0";

/// `SELECT version()`.
pub fn version() -> String {
    format!(
        "PostgreSQL {SERVER_VERSION} (pgmirror {} admin console)",
        env!("CARGO_PKG_VERSION")
    )
}

/// Every setting `SHOW` knows, with its value.
pub fn all() -> Vec<(&'static str, String)> {
    let fixed = [
        ("server_version_num", "150000"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("datestyle", "ISO, MDY"),
        ("timezone", "UTC"),
        ("intervalstyle", "postgres"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("transaction_isolation", "read committed"),
        ("transaction_read_only", "on"),
        ("default_transaction_read_only", "on"),
        ("is_superuser", "off"),
        ("max_identifier_length", "63"),
        ("search_path", "sys, pgmirror"),
        ("application_name", ""),
        ("extra_float_digits", "1"),
    ];
    let mut settings = vec![(
        "server_version",
        format!("{SERVER_VERSION} (pgmirror {})", env!("CARGO_PKG_VERSION")),
    )];
    settings.extend(fixed.iter().map(|(name, value)| (*name, value.to_string())));
    settings
}

/// One setting's value, by name in any case.
pub fn value(name: &str) -> Option<String> {
    all()
        .into_iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

/// The names `SHOW` accepts, for errors.
pub fn names() -> String {
    let names: Vec<&str> = all().into_iter().map(|(name, _)| name).collect();
    names.join(", ")
}
