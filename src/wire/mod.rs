//! PostgreSQL frame reading for the shipper and proxy: the pieces that watch
//! bytes relayed between a client and a server without taking part.
//!
//! `lsn` is the WAL position type, `frame` splits one direction of a protocol
//! v3 connection into messages without buffering bodies, and `replication`
//! decodes the streaming-replication sub-messages carried in CopyData;
//! `notice` decodes NoticeResponse fields and recognises the notice of a
//! cut synchronous-replication wait (the proxy's commit fence);
//! `startup` decodes a connection's first packet and builds the few
//! messages the proxy writes itself; `auth` the authentication requests
//! and answers the proxy exchanges when it authenticates clients itself;
//! `extended` the query messages a transaction-mode proxy rewrites.

pub mod auth;
pub mod extended;
pub mod frame;
pub mod lsn;
pub mod notice;
pub mod replication;
pub mod startup;
