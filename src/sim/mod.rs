//! The engine simulator: wire protocols over a model of a continuous-batching GPU engine.

pub mod engine;
pub mod profile;
pub mod tokenizer;

pub mod behaviour;
pub mod config;
pub mod draw;
pub mod faults;
pub mod prompt;
pub mod schema_gen;
pub mod server;

pub use config::{BehaviourConfig, FaultConfig, OutputLen, SimConfig, SimError};
pub use server::SimServer;
