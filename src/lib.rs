//! cloudbrain: a multi-cloud instance broker, wire-compatible with Travis CI's Cloud Brain.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod crypto;
pub mod db;
pub mod dev;
pub mod ids;
pub mod json;
pub mod memory;
pub mod metrics;
pub mod providers;
pub mod queue;
pub mod roles;
pub mod shutdown;
pub mod telemetry;
pub mod workers;
