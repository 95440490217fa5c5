//! Structured output: JSON extraction and repair from model text, JSON Schema validation.
//!
//! The agent loop runs [`extract_json`] on a final answer, then [`CompiledSchema::validate`]; on
//! failure, [`describe`] turns the violations into the feedback of a retry.

mod extract;
mod repair;
mod schema;

use thiserror::Error;

pub use extract::{extract_json, Extracted};
pub use repair::repair_json;
pub use schema::{describe, CompiledSchema, Violation};

/// Why no JSON value could be taken from a model's answer. The messages are written to be fed back
/// to the model.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExtractError {
    #[error("the answer is empty; expected a JSON value")]
    Empty,
    #[error("no JSON object or array found in the answer")]
    NotFound,
    #[error("the JSON starting at byte {offset} of the answer is invalid and could not be repaired: {message}")]
    Invalid { offset: usize, message: String },
}

/// A JSON Schema that cannot be compiled: one its draft's meta-schema rejects, a `pattern` that is
/// not a regular expression, a `$ref` that does not resolve within the schema. `pointer` is the
/// JSON pointer (RFC 6901) of the bad part within the schema, `""` for the root.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchemaError {
    #[error("schema at '#{pointer}': {message}")]
    Invalid { pointer: String, message: String },
}
