//! Validation before any charge: content type, JSON, input shape.

use serde_json::json;

use super::prelude::*;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!("validate.invalid_json", "a body that is not JSON → 400 invalid_json, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.call(&ep, &key, "{\"oops\":");
            refused_uncharged(c, &r, 400, "invalid_json", &key, bal)
        }),
        scenario!("validate.empty_body", "an empty body → 400, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.call(&ep, &key, "");
            refused_uncharged(c, &r, 400, "", &key, bal)
        }),
        scenario!("validate.not_object", "a JSON array body → 400 invalid_input, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.call(&ep, &key, "[1,2,3]");
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.wrong_type", "a required field of the wrong type → 400 invalid_input, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let Some((field, ty, _)) = ep.input.iter().find(|f| f.2).cloned() else {
                return Ok(Outcome::NotApplicable(format!("{} has no required field", ep.name)));
            };
            let mut body = ep.sample();
            body[&field] = if ty == "string" { json!(42) } else { json!("not a value of this type") };
            let r = c.call(&ep, &key, &body.to_string());
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.missing_field", "a required field missing → 400 invalid_input, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            if !ep.input.iter().any(|f| f.2) {
                return Ok(Outcome::NotApplicable(format!("{} has no required field", ep.name)));
            }
            let r = c.call(&ep, &key, "{}");
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.unknown_field", "an unknown field → 400 invalid_input, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let mut body = ep.sample();
            body["__audit_unknown"] = json!(1);
            let r = c.call(&ep, &key, &body.to_string());
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.proto_pollution", "a __proto__ field → 400, no charge, no crash", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let body = ep.sample().to_string();
            let polluted = format!("{{\"__proto__\":{{\"admin\":true}},{}", &body[1..]);
            let r = c.call(&ep, &key, &polluted);
            refused_uncharged(c, &r, 400, "invalid_input", &key, bal)
        }),
        scenario!("validate.deep_nesting", "1000 nested arrays → 400, no charge, no 5xx", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
            let r = c.call(&ep, &key, &format!("{{\"x\":{deep}}}"));
            refused_uncharged(c, &r, 400, "", &key, bal)
        }),
        scenario!("validate.wrong_content_type", "Content-Type text/plain → 415, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.request("POST", &ep.path(), &[("Authorization", &key.bearer()), ("Content-Type", "text/plain")], Some(ep.sample().to_string().as_bytes()));
            refused_uncharged(c, &r, 415, "unsupported_media_type", &key, bal)
        }),
        scenario!("validate.no_content_type", "no Content-Type → 415, no charge", |c, _| {
            let (ep, key, bal) = setup(c)?;
            let r = c.request("POST", &ep.path(), &[("Authorization", &key.bearer())], Some(ep.sample().to_string().as_bytes()));
            refused_uncharged(c, &r, 415, "unsupported_media_type", &key, bal)
        }),
    ]
}
