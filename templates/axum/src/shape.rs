//! Input shape check from mcpay.toml ([endpoints.<name>] input): a JSON object, known fields
//! only, required fields present, strict types. Runs before any charge.

use serde_json::{Map, Value};

pub const MAX_JSON_DEPTH: usize = 32;
/// Integers must be exactly representable in a double, as in JavaScript (2^53 - 1).
pub const MAX_SAFE_INTEGER: i64 = 9_007_199_254_740_991;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::Boolean => "boolean",
            FieldType::Object => "object",
            FieldType::Array => "array",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    pub name: &'static str,
    pub ty: FieldType,
    pub required: bool,
}

/// A JSON number that is a safe integer: no fractional part, |n| <= 2^53 - 1 (as JavaScript's
/// Number.isSafeInteger, so `1e3` and `1.0` count; `1.5`, `"1"`, `true` and 1e23 do not).
pub fn as_safe_integer(v: &Value) -> Option<i64> {
    let Value::Number(n) = v else { return None };
    let i = match n.as_i64() {
        Some(i) => i,
        None => {
            let f = n.as_f64()?;
            if !f.is_finite() || f.fract() != 0.0 || f.abs() > MAX_SAFE_INTEGER as f64 {
                return None;
            }
            f as i64
        }
    };
    (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i).then_some(i)
}

/// After a successful [`check_shape`]: rewrites integer fields written as `1e3` or `2.0` as
/// plain integers, so the typed input structs (i64) accept them.
pub fn normalize_integers(input: &mut Value, shape: &[FieldSpec]) {
    let Some(obj) = input.as_object_mut() else { return };
    for spec in shape.iter().filter(|s| s.ty == FieldType::Integer) {
        if let Some(v) = obj.get_mut(spec.name)
            && let Some(i) = as_safe_integer(v)
        {
            *v = Value::from(i);
        }
    }
}

fn has_type(v: &Value, t: FieldType) -> bool {
    match t {
        FieldType::String => v.is_string(),
        FieldType::Number => v.as_f64().is_some_and(f64::is_finite),
        FieldType::Integer => as_safe_integer(v).is_some(),
        FieldType::Boolean => v.is_boolean(),
        FieldType::Object => v.is_object(),
        FieldType::Array => v.is_array(),
    }
}

/// True when `value` nests objects/arrays deeper than `max` (scalars are depth 0). Iterative.
pub fn depth_exceeds(value: &Value, max: usize) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        if d + 1 > max {
            return true;
        }
        stack.extend(children.map(|c| (c, d + 1)));
    }
    false
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `Ok(())` when `input` matches `shape`, else a message naming the first problem.
pub fn check_shape(input: &Value, shape: &[FieldSpec]) -> Result<(), String> {
    let Some(obj): Option<&Map<String, Value>> = input.as_object() else {
        return Err("Body must be a JSON object.".into());
    };
    if depth_exceeds(input, MAX_JSON_DEPTH) {
        return Err(format!("JSON nesting deeper than {MAX_JSON_DEPTH} levels."));
    }
    for field in obj.keys() {
        if !shape.iter().any(|s| s.name == field) {
            return Err(format!("Unknown field \"{}\".", clip(field)));
        }
    }
    for spec in shape {
        match obj.get(spec.name) {
            None if spec.required => return Err(format!("Missing required field \"{}\".", spec.name)),
            None => {}
            Some(v) if !has_type(v, spec.ty) => {
                return Err(format!("Field \"{}\" must be of type {}.", spec.name, spec.ty.as_str()));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHAPE: &[FieldSpec] = &[
        FieldSpec { name: "s", ty: FieldType::String, required: true },
        FieldSpec { name: "n", ty: FieldType::Number, required: false },
        FieldSpec { name: "i", ty: FieldType::Integer, required: false },
        FieldSpec { name: "b", ty: FieldType::Boolean, required: false },
        FieldSpec { name: "o", ty: FieldType::Object, required: false },
        FieldSpec { name: "a", ty: FieldType::Array, required: false },
    ];

    #[test]
    fn strict_types() {
        assert!(check_shape(&json!({ "s": "x", "n": 1.5, "i": 2, "b": false, "o": {}, "a": [] }), SHAPE).is_ok());
        assert!(check_shape(&json!({ "s": "x" }), SHAPE).is_ok());
        for bad in [
            json!({}),
            json!({ "s": 1 }),
            json!({ "s": "x", "n": "1" }),
            json!({ "s": "x", "i": 1.5 }),
            json!({ "s": "x", "i": 9007199254740992u64 }),
            json!({ "s": "x", "b": 0 }),
            json!({ "s": "x", "o": [] }),
            json!({ "s": "x", "o": null }),
            json!({ "s": "x", "a": {} }),
            json!({ "s": "x", "z": 1 }),
            json!([]),
        ] {
            assert!(check_shape(&bad, SHAPE).is_err(), "{bad}");
        }
        let mut v: Value = serde_json::from_str(r#"{"s":"x","i":2.0}"#).unwrap();
        assert!(check_shape(&v, SHAPE).is_ok());
        normalize_integers(&mut v, SHAPE);
        assert_eq!(v["i"].as_i64(), Some(2));
    }

    #[test]
    fn depth() {
        let mut v = json!(1);
        for _ in 0..MAX_JSON_DEPTH {
            v = json!([v]);
        }
        assert!(!depth_exceeds(&v, MAX_JSON_DEPTH));
        assert!(depth_exceeds(&json!([v]), MAX_JSON_DEPTH));
    }
}
