//! The engine simulator: wire protocols over a model of a continuous-batching GPU engine.

pub mod engine;
pub mod prefix_cache;
pub mod profile;
pub mod tokenizer;
