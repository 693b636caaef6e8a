//! Session parameters in transaction mode: what each client has set (its
//! startup packet's parameters, then its top-level SET and RESET), what
//! each pooled server connection has had set, and the SQL that turns the
//! one into the other before a client's transaction runs there. Values are
//! kept as `current_setting` prints them and re-applied with `set_config`,
//! which takes that form back for every parameter (a list such as
//! search_path included). Pure.
//!
//! The values in force for a client are also kept whole, shared
//! ([`ClientSettings::in_force`]): a pool shares one such map among its
//! clients with the same values ([`ClientSettings::adopt`]), and a server
//! connection keeps the one it was given, so that the check before each
//! transaction usually compares two pointers.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Startup parameters that are not session settings.
const NOT_SETTINGS: [&str; 4] = ["user", "database", "replication", "options"];

/// A client's parameters: its startup packet's, then what it set since.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// Sorted by name. A Vec, not a map: it lives as long as the client,
    /// and a map's first node is about half a kilobyte.
    startup: Vec<(String, String)>,
    set: BTreeMap<String, String>,
    /// Both together: the values in force.
    in_force: Arc<ServerSettings>,
}

/// What a server connection has had set beyond its own defaults.
pub type ServerSettings = BTreeMap<String, String>;

impl ClientSettings {
    /// From a startup packet's parameters; `options` is read for `-c
    /// name=value` and `--name=value`, as PostgreSQL reads it.
    pub fn from_startup(params: &[(String, String)]) -> ClientSettings {
        let mut startup = BTreeMap::new();
        for (name, value) in params {
            if name == "options" {
                for (name, value) in options(value) {
                    startup.insert(name, value);
                }
            } else if !NOT_SETTINGS.contains(&name.as_str()) && !name.starts_with("_pq_.") {
                startup.insert(name.to_lowercase(), value.clone());
            }
        }
        let mut client = ClientSettings {
            startup: startup.into_iter().collect(),
            ..ClientSettings::default()
        };
        client.update();
        client
    }

    /// Recomputes the values in force.
    fn update(&mut self) {
        let mut all = self.startup.iter().cloned().collect::<ServerSettings>();
        all.extend(self.set.clone());
        self.in_force = Arc::new(all);
    }

    /// The values in force for this client.
    pub fn in_force(&self) -> &Arc<ServerSettings> {
        &self.in_force
    }

    /// Takes `shared`, a map equal to its own values in force, in their
    /// place (one of its pool's, see the module's text).
    pub fn adopt(&mut self, shared: Arc<ServerSettings>) {
        if *shared == *self.in_force {
            self.in_force = shared;
        }
    }

    /// The value in force for this client of one parameter.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.in_force.get(name).map(String::as_str)
    }

    /// Whether `server` has exactly this client's values: the common case
    /// (its last client had the same), most often the very same map.
    fn in_force_on(&self, server: &Arc<ServerSettings>) -> bool {
        Arc::ptr_eq(&self.in_force, server) || *self.in_force == **server
    }

    /// A parameter's value as read back from the server after the client's
    /// transaction; None: RESET (back to the startup value or default).
    pub fn record(&mut self, name: &str, value: Option<String>) {
        match value {
            Some(value) => {
                self.set.insert(name.to_string(), value);
            }
            None => {
                self.set.remove(name);
            }
        }
        self.update();
    }

    /// RESET ALL or DISCARD ALL.
    pub fn reset_all(&mut self) {
        self.set.clear();
        self.update();
    }
}

/// The SQL that gives `server` the client's parameters: RESET for what the
/// server has and the client has not, set_config for the rest that
/// differs; None when nothing differs (the common case: the connection's
/// last client had the same parameters).
pub fn prelude(client: &ClientSettings, server: &Arc<ServerSettings>) -> Option<String> {
    if client.in_force_on(server) {
        return None;
    }
    let wanted = client.in_force();
    let mut sql = String::new();
    for name in server.keys() {
        if !wanted.contains_key(name) {
            sql.push_str(&format!("RESET {};", quote_identifier(name)));
        }
    }
    let sets: Vec<String> = wanted
        .iter()
        .filter(|(name, value)| server.get(*name) != Some(*value))
        .map(|(name, value)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(value)
            )
        })
        .collect();
    if !sets.is_empty() {
        sql.push_str(&format!("SELECT {};", sets.join(", ")));
    }
    (!sql.is_empty()).then_some(sql)
}

/// The query that reads back the parameters a transaction touched.
pub fn read_back(names: &[String]) -> String {
    let columns: Vec<String> = names
        .iter()
        .map(|name| format!("pg_catalog.current_setting({}, true)", quote_literal(name)))
        .collect();
    format!("SELECT {}", columns.join(", "))
}

/// `-c name=value` and `--name=value` pairs of an `options` string
/// (backslash escapes a space, as PostgreSQL's pg_split_opts).
fn options(value: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut pairs = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next()
        } else if let Some(rest) = word.strip_prefix("-c") {
            Some(rest.to_string())
        } else {
            word.strip_prefix("--").map(str::to_string)
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            pairs.push((name.replace('-', "_").to_lowercase(), value.to_string()));
        }
    }
    pairs
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn quote_identifier(text: &str) -> String {
    // Dotted custom parameters are written as they are; others quoted.
    if text.contains('.') {
        text.split('.')
            .map(quote_identifier)
            .collect::<Vec<_>>()
            .join(".")
    } else {
        format!("\"{}\"", text.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn startup_parameters_and_options_become_settings() {
        let client = ClientSettings::from_startup(&params(&[
            ("user", "app"),
            ("database", "shop"),
            ("application_name", "billing"),
            (
                "options",
                "-c search_path=app,public --statement-timeout=5s -cwork_mem=8MB",
            ),
            ("_pq_.compression", "on"),
        ]));
        assert_eq!(client.get("application_name"), Some("billing"));
        assert_eq!(client.get("search_path"), Some("app,public"));
        assert_eq!(client.get("statement_timeout"), Some("5s"));
        assert_eq!(client.get("work_mem"), Some("8MB"));
        assert_eq!(client.in_force().len(), 4);
    }

    #[test]
    fn prelude_applies_only_what_differs() {
        let mut client = ClientSettings::from_startup(&params(&[("application_name", "a")]));
        let fresh = Arc::default();
        let sql = prelude(&client, &fresh).expect("something to set");
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config('application_name', 'a', false);"
        );
        let server = client.in_force().clone();
        assert_eq!(prelude(&client, &server), None);
        client.record("search_path", Some("\"$user\", it's".into()));
        assert_eq!(
            prelude(&client, &server).unwrap(),
            "SELECT pg_catalog.set_config('search_path', '\"$user\", it''s', false);"
        );
        let other = ClientSettings::default();
        assert_eq!(
            prelude(&other, client.in_force()).unwrap(),
            "RESET \"application_name\";RESET \"search_path\";"
        );
        client.reset_all();
        client.record("application_name", None);
        assert_eq!(client.get("application_name"), Some("a"));
    }

    #[test]
    fn a_shared_map_of_the_same_values_is_adopted_and_compared_by_pointer() {
        let mut client = ClientSettings::from_startup(&params(&[("application_name", "a")]));
        let shared = Arc::new(ServerSettings::from([(
            "application_name".into(),
            "a".into(),
        )]));
        client.adopt(shared.clone());
        assert!(Arc::ptr_eq(client.in_force(), &shared));
        assert_eq!(prelude(&client, &shared), None);
        // A map of other values is not adopted.
        let other = Arc::new(ServerSettings::from([(
            "application_name".into(),
            "b".into(),
        )]));
        client.adopt(other.clone());
        assert!(Arc::ptr_eq(client.in_force(), &shared));
        assert!(prelude(&client, &other).is_some());
        // A change makes a map of the client's own.
        client.record("search_path", Some("x".into()));
        assert!(!Arc::ptr_eq(client.in_force(), &shared));
        assert_eq!(client.get("search_path"), Some("x"));
        assert!(prelude(&client, &shared).is_some());
    }

    #[test]
    fn read_back_reads_every_touched_name() {
        assert_eq!(
            read_back(&["a".into(), "my.x".into()]),
            "SELECT pg_catalog.current_setting('a', true), pg_catalog.current_setting('my.x', true)"
        );
    }
}
