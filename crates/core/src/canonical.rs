//! Canonical JSON straight from `Serialize`: the bytes [`crate::canonical_json`] gives for
//! `serde_json::to_value(x)`, written without building the `Value`.
//!
//! A run's `run.created` carries its whole task graph, tens of thousands of structs: building
//! them as a `Value` tree (a map and a string per field) only to write it out was most of a
//! large run's start. This serializer writes each object's members into the output as serde
//! hands them over, notes where each starts, and puts them in byte order of their keys when the
//! object ends (most objects need one copy of their own bytes, none a map).
//!
//! It follows `serde_json::value::Serializer` wherever the two could differ: non-finite floats
//! are `null`, map keys may be strings, characters, integers or booleans (written as strings),
//! bytes are an array of numbers, a unit variant is its name and a newtype, tuple or struct
//! variant an object with its name as the only key. Should serde's maps keep insertion order in
//! this build (its `preserve_order` feature), a map's entries are sorted all the same, as
//! `canonical_json` sorts them.

use serde::ser::{self, Serialize};

use crate::event::{write_canonical_json, write_integer, write_json_number, write_json_string};

/// Why a value has no JSON form (what `serde_json::to_value` would refuse).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CanonicalError(String);

impl ser::Error for CanonicalError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        CanonicalError(msg.to_string())
    }
}

/// Appends the canonical JSON of `value` to `out`, as [`crate::canonical_json`] of
/// `serde_json::to_value(value)` would. On error `out` is left as it was.
///
/// ```
/// #[derive(serde::Serialize)]
/// struct Task { id: String, needs: Vec<String>, attempt: u32 }
/// let mut out = Vec::new();
/// agent_runtime_core::write_canonical(&Task { id: "a".into(), needs: vec![], attempt: 2 }, &mut out).unwrap();
/// assert_eq!(out, br#"{"attempt":2,"id":"a","needs":[]}"#);
/// ```
pub fn write_canonical<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CanonicalError> {
    let at = out.len();
    let result = value.serialize(Canonical { out });
    if result.is_err() {
        out.truncate(at);
    }
    result
}

struct Canonical<'a> {
    out: &'a mut Vec<u8>,
}

/// serde has one method per integer type; each writes the integer (in quotes as an object key).
macro_rules! integers {
    (quoted: $quoted:expr; $($f:ident: $t:ty),*) => {$(
        fn $f(self, v: $t) -> Result<(), CanonicalError> {
            if $quoted {
                self.out.push(b'"');
            }
            write_integer(self.out, v);
            if $quoted {
                self.out.push(b'"');
            }
            Ok(())
        }
    )*};
}

impl<'a> ser::Serializer for Canonical<'a> {
    type Ok = ();
    type Error = CanonicalError;
    type SerializeSeq = Seq<'a>;
    type SerializeTuple = Seq<'a>;
    type SerializeTupleStruct = Seq<'a>;
    type SerializeTupleVariant = Seq<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), CanonicalError> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    integers!(quoted: false; serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64);
    // The rare kinds whose JSON form depends on serde_json's own rules (128-bit integers, f32)
    // go through a `Value`, so they cannot drift from it.
    fn serialize_i128(self, v: i128) -> Result<(), CanonicalError> {
        through_value(self.out, &v)
    }
    fn serialize_u128(self, v: u128) -> Result<(), CanonicalError> {
        through_value(self.out, &v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), CanonicalError> {
        through_value(self.out, &v)
    }
    fn serialize_f64(self, v: f64) -> Result<(), CanonicalError> {
        match serde_json::Number::from_f64(v) {
            Some(n) => write_json_number(&n, self.out),
            None => self.out.extend_from_slice(b"null"),
        }
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), CanonicalError> {
        write_json_string(v.encode_utf8(&mut [0; 4]), self.out);
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), CanonicalError> {
        write_json_string(v, self.out);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), CanonicalError> {
        self.out.push(b'[');
        for (i, b) in v.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            write_integer(self.out, *b);
        }
        self.out.push(b']');
        Ok(())
    }
    fn serialize_none(self) -> Result<(), CanonicalError> {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), CanonicalError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), CanonicalError> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), CanonicalError> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), CanonicalError> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), CanonicalError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), CanonicalError> {
        self.out.push(b'{');
        write_json_string(variant, self.out);
        self.out.push(b':');
        value.serialize(Canonical { out: self.out })?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Seq<'a>, CanonicalError> {
        Ok(Seq::start(self.out, false))
    }
    fn serialize_tuple(self, len: usize) -> Result<Seq<'a>, CanonicalError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<Seq<'a>, CanonicalError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Seq<'a>, CanonicalError> {
        open_variant(self.out, variant);
        Ok(Seq::start(self.out, true))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Object<'a>, CanonicalError> {
        Ok(Object::start(self.out, false))
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Object<'a>, CanonicalError> {
        Ok(Object::start(self.out, false))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Object<'a>, CanonicalError> {
        open_variant(self.out, variant);
        Ok(Object::start(self.out, true))
    }
}

fn through_value<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), CanonicalError> {
    let value = serde_json::to_value(v).map_err(|e| CanonicalError(e.to_string()))?;
    write_canonical_json(&value, out);
    Ok(())
}

/// `{"VARIANT":` of a tuple or struct variant; the matching `}` comes when it ends.
fn open_variant(out: &mut Vec<u8>, variant: &str) {
    out.push(b'{');
    write_json_string(variant, out);
    out.push(b':');
}

/// An array being written (and, for a tuple variant, the object around it).
struct Seq<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    variant: bool,
}

impl<'a> Seq<'a> {
    fn start(out: &'a mut Vec<u8>, variant: bool) -> Seq<'a> {
        out.push(b'[');
        Seq {
            out,
            first: true,
            variant,
        }
    }
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), CanonicalError> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        value.serialize(Canonical { out: self.out })
    }
    fn finish(self) -> Result<(), CanonicalError> {
        self.out.push(b']');
        if self.variant {
            self.out.push(b'}');
        }
        Ok(())
    }
}

/// serde has one trait per kind of sequence and of struct; each of ours does the same thing.
macro_rules! forward {
    ($ty:ident: $($trait:ident :: $method:ident => $to:ident),*) => {$(
        impl ser::$trait for $ty<'_> {
            type Ok = ();
            type Error = CanonicalError;
            fn $method<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), CanonicalError> {
                self.$to(v)
            }
            fn end(self) -> Result<(), CanonicalError> {
                self.finish()
            }
        }
    )*};
}

forward!(Seq: SerializeSeq::serialize_element => element,
    SerializeTuple::serialize_element => element,
    SerializeTupleStruct::serialize_field => element,
    SerializeTupleVariant::serialize_field => element);

/// An object being written: its members go to the output as they come, each noted by where its
/// key starts, where its value starts and where it ends; `finish` puts them in byte order of
/// their keys (a later member with the same key replaces an earlier one, as in a map).
struct Object<'a> {
    out: &'a mut Vec<u8>,
    /// Where the first member starts (just after `{`).
    start: usize,
    /// Per member: key start (at its opening quote), value start, value end.
    members: Vec<(usize, usize, usize)>,
    /// Where the pending map key (`serialize_key`) starts, until its value comes.
    pending_key: Option<usize>,
    variant: bool,
}

impl<'a> Object<'a> {
    fn start(out: &'a mut Vec<u8>, variant: bool) -> Object<'a> {
        out.push(b'{');
        let start = out.len();
        Object {
            out,
            start,
            members: Vec::new(),
            pending_key: None,
            variant,
        }
    }

    fn key_text(&self, (k, v, _): (usize, usize, usize)) -> &[u8] {
        // The key as written: a JSON string, then `:`. Keys are compared by their text; for
        // keys that needed escapes, by their unescaped bytes (what `canonical_json` sorts by).
        &self.out[k..v - 1]
    }

    fn value<T: Serialize + ?Sized>(&mut self, key_at: usize, v: &T) -> Result<(), CanonicalError> {
        self.out.push(b':');
        let value_at = self.out.len();
        v.serialize(Canonical { out: self.out })?;
        self.members.push((key_at, value_at, self.out.len()));
        Ok(())
    }

    /// The separator before a member, if it is not the first.
    fn comma(&mut self) {
        if !self.members.is_empty() {
            self.out.push(b',');
        }
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &str, v: &T) -> Result<(), CanonicalError> {
        self.comma();
        let key_at = self.out.len();
        write_json_string(key, self.out);
        self.value(key_at, v)
    }

    fn finish(mut self) -> Result<(), CanonicalError> {
        let in_order = self
            .members
            .windows(2)
            .all(|w| key_order(self.key_text(w[0]), self.key_text(w[1])).is_lt());
        // Members written in byte order of their keys (derived structs whose fields are
        // declared so, maps that iterate sorted) are already canonical; the others are laid
        // out again from a copy of the object's bytes.
        if !in_order {
            let base = self.start;
            let region = self.out[base..].to_vec();
            let key = |(k, v, _): (usize, usize, usize)| &region[k - base..v - 1 - base];
            let mut order = std::mem::take(&mut self.members);
            // Stable, so that among equal keys the one written last stays last.
            order.sort_by(|&a, &b| key_order(key(a), key(b)));
            order.dedup_by(|later, earlier| {
                let same = key(*later) == key(*earlier);
                if same {
                    *earlier = *later;
                }
                same
            });
            self.out.truncate(base);
            for (i, &(k, _, end)) in order.iter().enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                self.out.extend_from_slice(&region[k - base..end - base]);
            }
        }
        self.out.push(b'}');
        if self.variant {
            self.out.push(b'}');
        }
        Ok(())
    }
}

/// The order `canonical_json` gives keys: by the bytes of the key itself. `a` and `b` are keys
/// as written, JSON strings; when neither needed escapes (the common case) their bytes between
/// the quotes are the keys' own.
fn key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    if !a.contains(&b'\\') && !b.contains(&b'\\') {
        // Inside the quotes: a closing quote would sort a prefix after a longer key whose
        // next byte is below `"` (a space, `!`).
        return between_quotes(a).cmp(between_quotes(b));
    }
    let unescape = |k: &[u8]| serde_json::from_slice::<String>(k).unwrap_or_default();
    unescape(a).as_bytes().cmp(unescape(b).as_bytes())
}

fn between_quotes(key: &[u8]) -> &[u8] {
    key.get(1..key.len().saturating_sub(1)).unwrap_or(&[])
}

/// Struct fields have `'static` names; both struct kinds write them the same way.
macro_rules! struct_fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Object<'_> {
            type Ok = ();
            type Error = CanonicalError;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                v: &T,
            ) -> Result<(), CanonicalError> {
                self.field(key, v)
            }
            fn end(self) -> Result<(), CanonicalError> {
                self.finish()
            }
        }
    )*};
}

struct_fields!(SerializeStruct, SerializeStructVariant);

impl ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = CanonicalError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), CanonicalError> {
        self.comma();
        let at = self.out.len();
        key.serialize(MapKey { out: self.out })?;
        self.pending_key = Some(at);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), CanonicalError> {
        let at = self
            .pending_key
            .take()
            .ok_or_else(|| CanonicalError("a map value without its key".into()))?;
        self.value(at, v)
    }
    fn end(self) -> Result<(), CanonicalError> {
        self.finish()
    }
}

/// Writes a map key as a JSON string, from the kinds of keys `serde_json` accepts.
struct MapKey<'a> {
    out: &'a mut Vec<u8>,
}

fn key_must_be_a_string() -> CanonicalError {
    CanonicalError("key must be a string".into())
}

impl ser::Serializer for MapKey<'_> {
    type Ok = ();
    type Error = CanonicalError;
    type SerializeSeq = ser::Impossible<(), CanonicalError>;
    type SerializeTuple = ser::Impossible<(), CanonicalError>;
    type SerializeTupleStruct = ser::Impossible<(), CanonicalError>;
    type SerializeTupleVariant = ser::Impossible<(), CanonicalError>;
    type SerializeMap = ser::Impossible<(), CanonicalError>;
    type SerializeStruct = ser::Impossible<(), CanonicalError>;
    type SerializeStructVariant = ser::Impossible<(), CanonicalError>;

    integers!(quoted: true; serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_i128: i128, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_u128: u128);

    fn serialize_bool(self, v: bool) -> Result<(), CanonicalError> {
        self.serialize_str(if v { "true" } else { "false" })
    }
    fn serialize_f32(self, _v: f32) -> Result<(), CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_f64(self, _v: f64) -> Result<(), CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_char(self, v: char) -> Result<(), CanonicalError> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), CanonicalError> {
        write_json_string(v, self.out);
        Ok(())
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<(), CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_none(self) -> Result<(), CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _v: &T) -> Result<(), CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit(self) -> Result<(), CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), CanonicalError> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        v: &T,
    ) -> Result<(), CanonicalError> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _v: &T,
    ) -> Result<(), CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, CanonicalError> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, CanonicalError> {
        Err(key_must_be_a_string())
    }
}

/// The size of `value` as compact JSON text (as `serde_json::to_vec` writes it), measured
/// without building the text.
///
/// ```
/// use agent_runtime_core::canonical::json_size;
/// let v = serde_json::json!({"a": [1, "x\n"]});
/// assert_eq!(json_size(&v), serde_json::to_vec(&v).unwrap().len());
/// ```
pub fn json_size(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut size = Count(0);
    // Writing to a counter cannot fail, and a `Value` always serializes.
    let _ = serde_json::to_writer(&mut size, value);
    size.0
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::Serialize;
    use serde_json::{Value, json};

    use super::*;
    use crate::{SeededRng, canonical_json};

    fn both<T: Serialize>(x: &T) -> (String, String) {
        let mut direct = Vec::new();
        write_canonical(x, &mut direct).unwrap();
        let via_value = canonical_json(&serde_json::to_value(x).unwrap());
        (
            String::from_utf8(direct).unwrap(),
            String::from_utf8(via_value).unwrap(),
        )
    }

    const KEYS: &[&str] = &[
        "", "a", "a!", "a ", "ab", "b", "é", "a\"b", "\u{1}", "9", "10", "Z", "_", "a\\", "~",
    ];

    fn random_value(rng: &mut SeededRng, depth: u32) -> Value {
        match rng.below(if depth == 0 { 5 } else { 8 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.below(2) == 0),
            2 => json!(rng.below(u64::MAX) as i64),
            3 => json!(f64::from_bits(rng.below(u64::MAX)) / 1e300),
            4 => Value::String(KEYS[rng.below(KEYS.len() as u64) as usize].repeat(2)),
            5 => Value::Array(
                (0..rng.below(4))
                    .map(|_| random_value(rng, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..rng.below(6))
                    .map(|_| {
                        let k = KEYS[rng.below(KEYS.len() as u64) as usize].to_string();
                        (k, random_value(rng, depth - 1))
                    })
                    .collect(),
            ),
        }
    }

    /// Random JSON, through a `Value` (maps in order) and through a `HashMap` (maps in hash
    /// order, so members are put in order here), gives the bytes `canonical_json` gives.
    #[test]
    fn random_values_and_unordered_maps_match_canonical_json() {
        for seed in 0..400 {
            let mut rng = SeededRng::new(seed);
            let v = random_value(&mut rng, 4);
            let (direct, via) = both(&v);
            assert_eq!(direct, via, "seed {seed}");
            if let Value::Object(m) = &v {
                let unordered: HashMap<&String, &Value> = m.iter().collect();
                let (direct, via) = both(&unordered);
                assert_eq!(direct, via, "seed {seed}, hash map");
            }
        }
    }

    #[derive(Serialize)]
    struct Unit;

    #[derive(Serialize)]
    struct Wrapper(u8);

    #[derive(Serialize)]
    enum Kind {
        Plain,
        New(i32),
        Pair(u8, String),
        Fields { z: bool, a: Option<f64> },
    }

    /// Fields declared out of order, skipped ones, every kind of variant, integer and boolean
    /// map keys, the rare numbers that go through a `Value`.
    #[derive(Serialize)]
    struct Everything {
        zeta: Vec<Kind>,
        #[serde(skip_serializing_if = "Option::is_none")]
        gone: Option<u8>,
        alpha: (char, i128, u128, f32, f64),
        unit: Unit,
        wrapped: Wrapper,
        by_number: HashMap<u32, &'static str>,
        by_flag: BTreeMap<bool, i8>,
        #[serde(rename = "a b")]
        spaced: &'static str,
        a: Option<()>,
        nested: BTreeMap<String, Everything2>,
    }

    #[derive(Serialize)]
    struct Everything2 {
        y: u64,
        x: Value,
    }

    #[test]
    fn every_serde_shape_matches_canonical_json() {
        let x = Everything {
            zeta: vec![
                Kind::Plain,
                Kind::New(-7),
                Kind::Pair(1, "q\"".into()),
                Kind::Fields {
                    z: true,
                    a: Some(f64::NAN),
                },
                Kind::Fields { z: false, a: None },
            ],
            gone: None,
            alpha: ('é', -5, u128::from(u64::MAX), 0.1, 1e-7),
            unit: Unit,
            wrapped: Wrapper(3),
            by_number: [(10, "ten"), (9, "nine"), (100, "hundred")]
                .into_iter()
                .collect(),
            by_flag: [(true, 1), (false, 0)].into_iter().collect(),
            spaced: "s",
            a: Some(()),
            nested: [(
                "k".to_string(),
                Everything2 {
                    y: 1,
                    x: json!({"b": [1, {"d": 2, "c": 3}], "a": null}),
                },
            )]
            .into_iter()
            .collect(),
        };
        let (direct, via) = both(&x);
        assert_eq!(direct, via);
    }

    /// What `serde_json::to_value` refuses is refused, and the output is left as it was.
    #[test]
    fn keys_that_are_not_strings_are_refused_and_nothing_is_written() {
        let mut out = b"kept".to_vec();
        let map: BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into_iter().collect();
        assert!(write_canonical(&vec![json!(1), json!(2)], &mut out).is_ok());
        let before = out.clone();
        let e = write_canonical(&vec![map], &mut out).unwrap_err();
        assert!(e.to_string().contains("key must be a string"), "{e}");
        assert_eq!(out, before);
        assert!(
            serde_json::to_value(vec![
                [((1u8, 2u8), 3u8)].into_iter().collect::<BTreeMap<_, _>>()
            ])
            .is_err()
        );
    }
}
