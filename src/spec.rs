//! The batch specification, validated once, up front.
