//! PyProxy: run Python remotely from Python.
//!
//! This crate holds the wire protocol (always built, free of Python so the
//! client extension can use it) and, behind the default `server` feature, the
//! server that embeds CPython: [`engine`] runs atoms, [`server`] speaks the
//! protocol to clients.

pub mod protocol;

#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod fork;
#[cfg(feature = "server")]
pub mod server;
