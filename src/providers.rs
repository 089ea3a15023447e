//! Provider types and configs: which kinds of cloud exist, and what a stored config says
//! about the machines it offers.

use cloudbrain_provider::ConfigError;
use cloudbrain_provider_fake::FakeConfig;

/// The kinds of cloud a provider config can describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// The fake cloud, for development, tests and benchmarks.
    Fake,
    /// Amazon EC2.
    Ec2,
    /// Google Compute Engine.
    Gce,
}

impl ProviderKind {
    /// The value stored in `providers.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Fake => "fake",
            ProviderKind::Ec2 => "ec2",
            ProviderKind::Gce => "gce",
        }
    }

    /// Reads a stored type name.
    pub fn parse(value: &str) -> Option<Self> {
        [ProviderKind::Fake, ProviderKind::Ec2, ProviderKind::Gce]
            .into_iter()
            .find(|k| k.as_str() == value)
    }
}

/// What the broker needs to know of a provider config to accept requests for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSettings {
    /// The instance type names it offers.
    pub instance_types: Vec<String>,
}

/// Checks a config document for `kind` and returns what the broker needs of it.
pub fn settings(
    kind: ProviderKind,
    config: &serde_json::Value,
) -> Result<ProviderSettings, ConfigError> {
    match kind {
        ProviderKind::Fake => {
            let config = FakeConfig::parse(config)?;
            Ok(ProviderSettings {
                instance_types: config.instance_types,
            })
        }
        ProviderKind::Ec2 | ProviderKind::Gce => Err(ConfigError::new(
            "type",
            format!(
                "provider type {} is not available in this build yet; only fake is",
                kind.as_str()
            ),
        )),
    }
}
