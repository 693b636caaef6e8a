//! The admin console's language: `statement` parses the commands an
//! administrator types (ALTER DATABASE, SHOW CLIENTS ...), `view` defines
//! the tables the console shows, `sql` runs PostgreSQL-dialect queries over
//! them with the functions of `functions`, and `settings` answers SHOW.
//! All pure but for the in-memory SQLite; the proxy's `console` module
//! serves them over pgwire.

pub mod functions;
pub mod request;
pub mod settings;
pub mod sql;
pub mod statement;
pub mod view;
