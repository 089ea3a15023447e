//! cloudbrain: a multi-cloud instance broker, wire-compatible with Travis CI's Cloud Brain.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod crypto;
pub mod db;
pub mod dev;
pub mod jobs;
pub mod metrics;
pub mod providers;
pub mod roles;
pub mod telemetry;
pub mod workers;
