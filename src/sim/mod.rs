//! The engine simulator: wire protocols over a model of a continuous-batching GPU engine.

pub mod config;
pub mod draw;
pub mod schema_gen;
