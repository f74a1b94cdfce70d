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

/// A JSON integer literal within ±(2^53 - 1). `1.0`, `1e3` and strings are not integers.
pub fn as_safe_integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().filter(|i| (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(i)),
        _ => None,
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
