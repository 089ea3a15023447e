//! JSON read strictly: an object with a key twice is refused (`{"image": "a", "image":
//! "b"}` is ambiguous, and readers disagree on which one wins), and a number with no
//! fraction is an integer, as JSON Schema counts them (`3.0` is a valid `min_idle`).

use serde::Deserialize;

/// Reads `bytes` as one JSON value, strictly.
pub fn from_slice(bytes: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_slice(bytes).map(|Strict(value)| value)
}

/// Reads `text` as one JSON value, strictly.
pub fn from_str(text: &str) -> Result<serde_json::Value, serde_json::Error> {
    from_slice(text.as_bytes())
}

/// A JSON value read with duplicate object keys refused: `{"image": "a", "image": "b"}`
/// is ambiguous, and readers disagree on which one wins.
struct Strict(serde_json::Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Visitor).map(Strict)
    }
}

struct Visitor;

impl<'de> serde::de::Visitor<'de> for Visitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    /// A number with no fraction is an integer, as JSON Schema counts them: `3.0` is a
    /// valid `min_idle`.
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(whole(v).unwrap_or_else(|| v.into()))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// `v` as an integer when it has no fraction and an integer type holds it.
fn whole(v: f64) -> Option<serde_json::Value> {
    // 2^63 and 2^64, exactly: the first values past i64 and u64.
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    if v.fract() != 0.0 || !v.is_finite() {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    if (-I64_END..I64_END).contains(&v) {
        Some((v as i64).into())
    } else if (0.0..U64_END).contains(&v) {
        Some((v as u64).into())
    } else {
        None
    }
}
