//! The engine simulator: wire protocols over a model of a continuous-batching GPU engine.
