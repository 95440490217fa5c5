//! Durable state: the SQLite journal, JSONL sinks and input readers.
