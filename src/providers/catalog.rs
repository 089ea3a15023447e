//! The catalog: every kind of cloud this build knows. Adding a provider is writing a crate
//! that implements [`Factory`] and adding a line to [`CATALOG`].

use cloudbrain_provider::{ConfigError, Factory};

/// Every kind of cloud, by the name stored in `providers.type`.
pub static CATALOG: &[&dyn Factory] = &[
    &cloudbrain_provider_fake::FakeFactory,
    &cloudbrain_provider_ec2::Ec2Factory,
    &cloudbrain_provider_gce::GceFactory,
];

/// The names of every kind, in catalog order.
pub fn kinds() -> Vec<&'static str> {
    CATALOG.iter().map(|f| f.kind()).collect()
}

/// The kind named `kind`; the error names the kinds there are.
pub fn find(kind: &str) -> Result<&'static dyn Factory, ConfigError> {
    CATALOG
        .iter()
        .copied()
        .find(|f| f.kind() == kind)
        .ok_or_else(|| {
            ConfigError::new(
                "type",
                format!("unknown kind {kind:?}; one of: {}", kinds().join(", ")),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_unique_name_and_checks_its_configs() {
        let mut names = kinds();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOG.len(), "{names:?}");
        let offer = find("fake")
            .unwrap()
            .check(&serde_json::Value::Null)
            .unwrap();
        assert_eq!(offer.default_instance_type, "standard");
        let err = find("azure").err().unwrap();
        assert_eq!(err.field, "type");
        assert!(err.message.contains("fake, ec2, gce"), "{err}");
    }
}
