//! The tool pool: in-flight coalescing of identical calls, result caching, per-tool limits and the
//! batch collector.
