//! cloudbrain's integration tests: one binary, a module per area, and one harness
//! (`common`) they share. Each test starts what it needs against the Postgres server at
//! `TEST_DATABASE_URL` (`script/test` starts a throwaway one).

// A test that cannot go on should stop where it is, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::unreachable)]

mod common;

mod auth;
mod capacity;
mod cli;
mod contract;
mod deploy;
mod e2e;
mod ec2;
mod fleet;
mod gce;
mod http_process;
mod instances;
mod outage;
mod pooler;
mod pools;
mod scripts;
mod stream;
mod travis_worker;
mod ui;
mod webhooks;
mod worker_process;
mod workers;
