//! Structured output: JSON extraction and repair from model text, JSON Schema validation.
