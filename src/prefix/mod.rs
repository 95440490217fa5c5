//! Token-block hashing and shared-prefix detection.
