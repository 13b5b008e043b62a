//! Checks of YAML and JSON documents for what their parsers pass over without a word.
//!
//! Deserialized into a struct or a JSON value, a mapping that holds a key twice keeps the last
//! (a whole agent, a policy rule's argument, an environment variable silently gone), and YAML's
//! `.nan` and `.inf` become `null` in a JSON value. Files a person writes (task graphs, the
//! gateway's configuration, policies, MCP servers files) are read a second time as
//! [`JsonFaithful`], whose errors name the place as the parser's do.
//!
//! ```
//! use agent_runtime_core::document::JsonFaithful;
//! assert!(serde_json::from_str::<JsonFaithful>(r#"{"a": {"x": 1}, "b": {"x": 1}}"#).is_ok());
//! let err = serde_json::from_str::<JsonFaithful>(r#"{"a": 1, "a": 2}"#).unwrap_err();
//! assert!(err.to_string().starts_with("duplicate key `a`"), "{err}");
//! ```

use serde::Deserialize;

/// A document that the graph's JSON values hold as written (its content is not kept): no
/// mapping with a key twice, at any depth, and no NaN or infinity (YAML's `.nan`, `.inf`),
/// which a JSON value would turn into `null`.
#[derive(Debug, Clone, Copy)]
pub struct JsonFaithful;

impl<'de> Deserialize<'de> for JsonFaithful {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonFaithful)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonFaithful {
    type Value = JsonFaithful;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i128<E>(self, _: i128) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u128<E>(self, _: u128) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self, E> {
        if v.is_finite() {
            Ok(self)
        } else {
            Err(E::custom(format!(
                "{v} is no number JSON can hold (it would become null)"
            )))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_none<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<JsonFaithful>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        // Keys are read as text, as the maps and JSON objects the files are read into read
        // them: YAML's `3.1` and `3.10` are two keys there, `1` and `"1"` one.
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(duplicate(&key));
            }
            seen.insert(key);
            map.next_value::<JsonFaithful>()?;
        }
        Ok(self)
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Self, A::Error> {
        // A YAML tag (`!name value`): the value after it.
        use serde::de::VariantAccess;
        let (_, variant) = data.variant::<serde::de::IgnoredAny>()?;
        variant.newtype_variant::<JsonFaithful>()
    }
}

/// The error for a key written twice in one mapping, quoting it short.
fn duplicate<E: serde::de::Error>(key: &str) -> E {
    E::custom(format!(
        "duplicate key `{}` (the later one would silently replace the earlier)",
        crate::names::shown(key)
    ))
}

/// [`JsonFaithful`] for the values of some top-level keys only, for files that other programs
/// share (an MCP servers file a desktop host also reads): their other sections are theirs, and
/// a key twice there replaces nothing this runtime reads.
///
/// ```
/// use serde::de::DeserializeSeed;
/// use agent_runtime_core::document::JsonFaithfulUnder;
/// let check = |text: &str| {
///     JsonFaithfulUnder(&["servers"]).deserialize(&mut serde_json::Deserializer::from_str(text))
/// };
/// assert!(check(r#"{"theme": 1, "theme": 2, "servers": {"a": {}}}"#).is_ok());
/// assert!(check(r#"{"servers": {"a": {}, "a": {}}}"#).is_err());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct JsonFaithfulUnder<'a>(pub &'a [&'a str]);

impl<'de> serde::de::DeserializeSeed<'de> for JsonFaithfulUnder<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonFaithfulUnder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a mapping")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !self.0.contains(&key.as_str()) {
                map.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            if !seen.insert(key.clone()) {
                return Err(duplicate(&key));
            }
            map.next_value::<JsonFaithful>()?;
        }
        Ok(())
    }
    // Anything else is not this check's to judge: the file's own parse says what is wrong.
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Result<(), String> {
        serde_json::from_str::<JsonFaithful>(text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn keys_are_compared_as_text_at_any_depth_and_quoted_short() {
        assert!(json(r#"{"3.1": "old", "3.10": "new"}"#).is_ok());
        let e = json(r#"{"x": {"a": 1, "b": [{"k": 1, "k": 2}]}}"#).unwrap_err();
        assert!(e.starts_with("duplicate key `k`"), "{e}");
        let long = "k".repeat(500);
        let e = json(&format!(r#"{{"{long}": 1, "{long}": 2}}"#)).unwrap_err();
        assert!(e.len() < 300, "{e}");
    }
}
