//! The ids of cloudbrain's things, each its own type, written and read as its column.

use uuid::Uuid;

crate::id_type! {
    /// An instance, as clients name it in `/instances/<id>`.
    pub struct InstanceId(Uuid) as diesel::sql_types::Uuid;
}

crate::id_type! {
    /// A token: the `<id>` part of `<id>-<secret>`.
    pub struct TokenId(i32) as diesel::sql_types::Integer;
}

crate::id_type! {
    /// A job in the queue.
    pub struct JobId(i64) as diesel::sql_types::BigInt;
}

/// A random (version 4) UUID from the thread's generator: a system call per id, as
/// `Uuid::new_v4` makes, costs more than the rest of a cached read's request handling.
pub fn random_uuid() -> Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

impl InstanceId {
    /// A new, random id.
    pub fn new() -> Self {
        Self(random_uuid())
    }

    /// Reads an id as a client writes it; `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        Uuid::parse_str(text).ok().map(Self)
    }
}

impl Default for InstanceId {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_version_4_and_differ() {
        let (a, b) = (random_uuid(), random_uuid());
        assert_eq!(a.get_version(), Some(uuid::Version::Random));
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, b);
    }

    #[test]
    fn ids_read_and_show_as_their_bare_values() {
        let id = InstanceId::new();
        assert_eq!(InstanceId::parse(&id.to_string()), Some(id));
        assert_eq!(InstanceId::parse("not-a-uuid"), None);
        assert_eq!(serde_json::to_value(TokenId(7)).unwrap(), 7);
        assert_eq!(JobId(3).to_string(), "3");
    }
}
