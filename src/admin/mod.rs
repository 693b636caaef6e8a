//! The admin console's language: `statement` parses what an administrator
//! types into a typed enum, `view` builds the tables the console shows.
//! Both are pure; the proxy's `console` module serves them over pgwire.

pub mod statement;
pub mod view;
