//! The canonical text of a tool call's arguments: the coalescing and cache key, and what the tool
//! receives.

use std::io::Write;

use serde_json::Value;

/// Parses the model's raw argument text and prints it canonically: objects with keys sorted by
/// their UTF-8 bytes, no whitespace, strings and numbers as `serde_json` prints them. The sort is
/// done here rather than relying on `serde_json`'s map order, which becomes insertion order as soon
/// as any crate in the build enables its `preserve_order` feature.
///
/// Empty or all-whitespace text reads as `{}`: several engines stream `""` as the arguments of a
/// call to a parameterless tool. Anything else that is not a JSON object is an error message.
pub fn canonical_arguments(raw: &str) -> Result<String, String> {
    if raw.trim().is_empty() {
        return Ok("{}".to_owned());
    }
    let value: Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!("expected a JSON object, got {}", kind(&value)));
    }
    let mut out = Vec::with_capacity(raw.len());
    write_value(&value, &mut out).map_err(|e| format!("cannot print arguments: {e}"))?;
    String::from_utf8(out).map_err(|e| format!("cannot print arguments: {e}"))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> serde_json::Result<()> {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_value(item, out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    // `Vec<u8>` writes cannot fail; flushing keeps the `Write` contract explicit.
    out.flush().map_err(serde_json::Error::io)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sorts_keys_at_every_depth_and_drops_whitespace() {
        let raw = "{ \"b\": [1, {\"z\": null, \"a\": true}],\n \"a\": \"x y\" }";
        assert_eq!(canonical_arguments(raw).unwrap(), r#"{"a":"x y","b":[1,{"a":true,"z":null}]}"#);
    }

    #[test]
    fn keeps_number_spelling_and_escapes() {
        assert_eq!(
            canonical_arguments(r#"{"n": 1.50, "m": 1e3, "s": "\u00e9\n"}"#).unwrap(),
            "{\"m\":1000.0,\"n\":1.5,\"s\":\"é\\n\"}"
        );
    }

    #[test]
    fn rejects_non_objects_and_bad_json() {
        assert_eq!(canonical_arguments("[1]").unwrap_err(), "expected a JSON object, got an array");
        assert_eq!(canonical_arguments("\"x\"").unwrap_err(), "expected a JSON object, got a string");
        assert!(canonical_arguments("{\"a\":").unwrap_err().starts_with("not valid JSON"));
    }

    #[test]
    fn empty_text_is_an_empty_object() {
        assert_eq!(canonical_arguments("").unwrap(), "{}");
        assert_eq!(canonical_arguments("  \n").unwrap(), "{}");
    }

    fn shuffled_object(entries: &[(String, i64)], order: &[usize], spaced: bool) -> String {
        let sep = if spaced { " , " } else { "," };
        let colon = if spaced { " :\t" } else { ":" };
        let body: Vec<String> = order
            .iter()
            .map(|&i| format!("{}{colon}{}", serde_json::to_string(&entries[i].0).unwrap(), entries[i].1))
            .collect();
        format!("{{{}}}", body.join(sep))
    }

    proptest! {
        #[test]
        fn key_order_and_whitespace_do_not_change_the_key(
            map in proptest::collection::btree_map(".{0,6}", any::<i64>(), 0..8),
            seed in any::<u64>(),
        ) {
            let entries: Vec<(String, i64)> = map.into_iter().collect();
            let mut order: Vec<usize> = (0..entries.len()).collect();
            let mut rng = crate::scheduler::SplitMix64::new(seed);
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let sorted: Vec<usize> = (0..entries.len()).collect();
            let a = canonical_arguments(&shuffled_object(&entries, &sorted, false)).unwrap();
            let b = canonical_arguments(&shuffled_object(&entries, &order, true)).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(canonical_arguments(&a).unwrap(), a.clone());
        }
    }
}
