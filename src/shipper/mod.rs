//! The log shipper: carries the replication stream between partner agents,
//! compressed and authenticated, and learns from what it relays how far the
//! mirror has got.
//!
//! `relay` is the hot path (one relayed PostgreSQL connection); `positions`
//! is the IO-free bookkeeping of sent, flushed and applied WAL.

pub mod positions;
pub mod relay;
