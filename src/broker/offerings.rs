//! Capacity fallback. An offering is where a machine can be made: a provider config, an
//! instance type and a placement (a zone of the config). An instance's offerings are its
//! own shape in each of its provider's placements, then its pool's fallbacks in order,
//! each in its provider's placements. A create that fails for lack of capacity marks its
//! offering unavailable for [`UNAVAILABLE_FOR`] (in Postgres, so every worker skips it)
//! and moves the instance to the next offering that is not; the instance's events say
//! where it went. Choosing is a pure function ([`candidates`], [`choose`]).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

use super::model::Instance;
use super::state::{record_event, State};
use super::validate::ProviderName;
use super::{Broker, BrokerError};
use crate::crypto::SecretKey;
use crate::db::schema::{instances, pools, providers, unavailable_offerings};
use cloudbrain_provider::Offer;

/// How long an offering that had no room is skipped.
pub const UNAVAILABLE_FOR: Duration = Duration::from_secs(180);

/// Most fallbacks a pool lists.
pub const MAX_FALLBACKS: usize = 16;

/// One of a pool's fallbacks: another instance type, another provider config, or both
/// (what it leaves out is the pool's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    /// Another provider config (absent: the pool's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Another instance type (absent: the pool's, which the provider must offer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
}

/// What an instance was asked for, kept once a fallback moved it elsewhere.
#[derive(Debug, Deserialize)]
struct Asked {
    provider: String,
    instance_type: String,
}

/// Where a machine can be made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Offering {
    /// The provider config.
    pub provider: String,
    /// The broker's instance type name.
    pub instance_type: String,
    /// A zone of the config; `None` when it offers no choice.
    pub placement: Option<String>,
}

impl std::fmt::Display for Offering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.provider, self.instance_type)?;
        if let Some(placement) = &self.placement {
            write!(f, " in {placement}")?;
        }
        Ok(())
    }
}

/// Where a provider config makes machines: its placements, a preference order or equals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placements {
    /// Zones or subnets; empty: the provider's own choice.
    pub names: Vec<String>,
    /// Equals: instance `id` starts at [`cloudbrain_provider::first_placement`].
    pub spread: bool,
}

impl Placements {
    /// The placements for instance `id`, in the order to try them.
    fn for_instance(&self, id: uuid::Uuid) -> Vec<String> {
        let mut names = self.names.clone();
        if self.spread && !names.is_empty() {
            let first = cloudbrain_provider::first_placement(id, names.len());
            names.rotate_left(first);
        }
        names
    }
}

/// Every offering of instance `id`, a machine of `instance_type` on `provider` with
/// `fallbacks`, in the order to try them; `placements` are each provider's.
pub fn candidates(
    id: uuid::Uuid,
    provider: &str,
    instance_type: &str,
    fallbacks: &[Fallback],
    placements: &BTreeMap<String, Placements>,
) -> Vec<Offering> {
    let shapes = std::iter::once((provider, instance_type)).chain(fallbacks.iter().map(|f| {
        (
            f.provider.as_deref().unwrap_or(provider),
            f.instance_type.as_deref().unwrap_or(instance_type),
        )
    }));
    let mut all: Vec<Offering> = Vec::new();
    for (provider, instance_type) in shapes {
        let names = placements
            .get(provider)
            .map(|p| p.for_instance(id))
            .unwrap_or_default();
        let zones: Vec<Option<String>> = if names.is_empty() {
            vec![None]
        } else {
            names.into_iter().map(Some).collect()
        };
        for placement in zones {
            let offering = Offering {
                provider: provider.to_owned(),
                instance_type: instance_type.to_owned(),
                placement,
            };
            if !all.contains(&offering) {
                all.push(offering);
            }
        }
    }
    all
}

/// The first of `candidates` not `unavailable`; `None` when every one is.
pub fn choose<'a>(
    candidates: &'a [Offering],
    unavailable: &HashSet<Offering>,
) -> Option<&'a Offering> {
    candidates.iter().find(|o| !unavailable.contains(o))
}

/// Checks a pool's fallbacks: each names a provider config that exists, or an instance
/// type, or both, and the type is one its provider offers.
pub(super) async fn check_fallbacks(
    conn: &mut AsyncPgConnection,
    key: &SecretKey,
    pool_provider: &str,
    fallbacks: &[Fallback],
) -> Result<(), BrokerError> {
    if fallbacks.len() > MAX_FALLBACKS {
        return Err(BrokerError::invalid(
            "fallbacks",
            format!("at most {MAX_FALLBACKS} fallbacks"),
        ));
    }
    for (i, fallback) in fallbacks.iter().enumerate() {
        let named = |message: String| {
            BrokerError::invalid("fallbacks", format!("fallbacks[{i}]: {message}"))
        };
        if fallback.provider.is_none() && fallback.instance_type.is_none() {
            return Err(named(
                "must name a provider, an instance_type or both".to_owned(),
            ));
        }
        let provider = fallback.provider.as_deref().unwrap_or(pool_provider);
        let provider = ProviderName::parse(provider).map_err(|e| named(e.to_string()))?;
        let Some(offer) = super::providers::find_offer(conn, key, &provider).await? else {
            return Err(named(format!(
                "provider {:?} does not exist",
                provider.as_str()
            )));
        };
        if let Some(asked) = &fallback.instance_type {
            if !offer.instance_types.contains(asked) {
                return Err(named(format!(
                    "provider {:?} does not offer instance_type {asked:?}; it offers {}",
                    provider.as_str(),
                    offer.instance_types.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// A pool's stored fallbacks (a row that cannot be read has none).
pub fn fallbacks_of(stored: &serde_json::Value) -> Vec<Fallback> {
    Vec::<Fallback>::deserialize(stored).unwrap_or_default()
}

impl Broker {
    /// The offering the next create of `instance` goes to, written to its row (with an
    /// event when it moved); `None` when every offering of it is out of capacity now.
    /// What it places by is `known` (read with the job's claim), else read now.
    pub async fn place(
        &self,
        instance: &Instance,
        known: Option<&Placing>,
    ) -> Result<Option<Offering>, BrokerError> {
        let mut conn = self.conn().await?;
        // A pool's machine falls back from the pool's shape through the pool's list, then
        // its provider's; another from what it was asked for, through its provider's.
        let pool = match &instance.pool_name {
            Some(pool) => pools::table
                .find(pool)
                .select((pools::provider_name, pools::instance_type, pools::fallbacks))
                .first::<(String, String, serde_json::Value)>(&mut conn)
                .await
                .optional()?,
            None => None,
        };
        let asked = instance
            .asked
            .as_ref()
            .and_then(|a| Asked::deserialize(a).ok());
        let (provider, instance_type, mut fallbacks) = match (pool, asked) {
            (Some((provider, instance_type, stored)), _) => {
                (provider, instance_type, fallbacks_of(&stored))
            }
            (None, Some(asked)) => (asked.provider, asked.instance_type, Vec::new()),
            (None, None) => (
                instance.provider_name.clone(),
                instance.instance_type.clone(),
                Vec::new(),
            ),
        };
        let read;
        let Placing {
            offers: stored,
            unavailable,
        } = match known {
            Some(known) => known,
            None => {
                read = Placing::read(&conn).await?;
                &read
            }
        };
        let mut offers = BTreeMap::new();
        for (name, offer, provider_fallbacks) in stored {
            if *name == provider {
                fallbacks.extend(fallbacks_of(provider_fallbacks));
            }
            offers.insert(name.clone(), offer);
        }
        let mut placements = BTreeMap::new();
        let names: Vec<String> = std::iter::once(provider.clone())
            .chain(fallbacks.iter().filter_map(|f| f.provider.clone()))
            .collect();
        for name in names {
            let offer = match offers.get(&name) {
                Some(Some(stored)) => Offer::deserialize(stored).ok(),
                // Registered before offers were stored: worked out once, and kept.
                Some(None) => match ProviderName::parse(&name) {
                    Ok(parsed) => {
                        super::providers::find_offer(&mut conn, &self.key, &parsed).await?
                    }
                    Err(_) => None,
                },
                None => None,
            };
            if let Some(offer) = offer {
                let found = Placements {
                    names: offer.placements,
                    spread: offer.spread,
                };
                placements.insert(name, found);
            }
        }
        let mut all = candidates(
            instance.id.0,
            &provider,
            &instance_type,
            &fallbacks,
            &placements,
        );
        // Where an earlier attempt went comes first: it may have made the machine.
        let current = Offering {
            provider: instance.provider_name.clone(),
            instance_type: instance.instance_type.clone(),
            placement: instance.placement.clone(),
        };
        if let Some(at) = all.iter().position(|o| *o == current) {
            let current = all.remove(at);
            all.insert(0, current);
        }
        let Some(chosen) = choose(&all, unavailable).cloned() else {
            return Ok(None);
        };
        if chosen != current {
            // Moved for room, or given its first placement.
            let reason = all
                .contains(&current)
                .then(|| format!("placed on {chosen} ({current} has no room)"));
            conn.transaction::<_, BrokerError, _>(async |conn| {
                // What it was asked for is kept once it leaves it.
                let asked = instance.asked.clone().or_else(|| {
                    let left = chosen.provider != provider || chosen.instance_type != instance_type;
                    left.then(|| serde_json::json!({"provider": provider, "instance_type": instance_type}))
                });
                let moved = diesel::update(instances::table.find(instance.id))
                    .filter(instances::state.eq(State::Creating))
                    .set((
                        instances::provider_name.eq(&chosen.provider),
                        instances::instance_type.eq(&chosen.instance_type),
                        instances::placement.eq(&chosen.placement),
                        instances::asked.eq(&asked),
                    ))
                    .execute(conn)
                    .await?;
                if let (1, Some(reason)) = (moved, &reason) {
                    let (from, to) = (Some(State::Creating), State::Creating);
                    record_event(conn, instance.id, from, to, Some(reason)).await?;
                    tracing::info!(instance.id = %instance.id, "{reason}");
                }
                Ok(())
            })
            .await?;
            if reason.is_some() {
                self.announce(false);
            }
        }
        Ok(Some(chosen))
    }

    /// Marks `offering` out of capacity for [`UNAVAILABLE_FOR`], for every worker.
    pub async fn out_of_capacity(
        &self,
        offering: &Offering,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut conn = self.conn().await?;
        let skip = diesel::pg::data_types::PgInterval::from_microseconds(
            i64::try_from(UNAVAILABLE_FOR.as_micros()).unwrap_or(i64::MAX),
        );
        let until = diesel::dsl::now.into_sql::<diesel::sql_types::Timestamptz>()
            + skip.into_sql::<diesel::sql_types::Interval>();
        let placement = offering.placement.clone().unwrap_or_default();
        diesel::insert_into(unavailable_offerings::table)
            .values((
                unavailable_offerings::provider_name.eq(&offering.provider),
                unavailable_offerings::instance_type.eq(&offering.instance_type),
                unavailable_offerings::placement.eq(&placement),
                unavailable_offerings::until.eq(until),
                unavailable_offerings::reason.eq(reason),
            ))
            .on_conflict((
                unavailable_offerings::provider_name,
                unavailable_offerings::instance_type,
                unavailable_offerings::placement,
            ))
            .do_update()
            .set((
                unavailable_offerings::until.eq(until),
                unavailable_offerings::reason.eq(reason),
            ))
            .execute(&mut conn)
            .await?;
        tracing::warn!(%offering, reason, "offering {offering} has no room; skipped for {} s", UNAVAILABLE_FOR.as_secs());
        Ok(())
    }
}

/// What placing reads besides the instance: every provider config's offer and fallbacks,
/// and the offerings out of capacity now.
#[derive(Debug, Default)]
pub struct Placing {
    offers: Vec<(String, Option<serde_json::Value>, serde_json::Value)>,
    unavailable: HashSet<Offering>,
}

impl Placing {
    /// Both reads, sent at once (pipelined on the connection): one wait.
    pub(super) async fn read(conn: &AsyncPgConnection) -> Result<Self, BrokerError> {
        let mut on = conn;
        let offers = providers::table
            .select((providers::name, providers::offer, providers::fallbacks))
            .load(&mut on);
        let (offers, unavailable) = futures_util::try_join!(
            async { offers.await.map_err(BrokerError::from) },
            unavailable(conn)
        )?;
        Ok(Self {
            offers,
            unavailable,
        })
    }
}

/// The offerings out of capacity now (on a shared connection, so that it can be sent
/// with another read).
async fn unavailable(conn: &AsyncPgConnection) -> Result<HashSet<Offering>, BrokerError> {
    let mut conn = conn;
    let rows: Vec<(String, String, String)> = unavailable_offerings::table
        .filter(unavailable_offerings::until.gt(diesel::dsl::now))
        .select((
            unavailable_offerings::provider_name,
            unavailable_offerings::instance_type,
            unavailable_offerings::placement,
        ))
        .load(&mut conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(provider, instance_type, placement)| Offering {
            provider,
            instance_type,
            placement: Some(placement).filter(|p| !p.is_empty()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offering(provider: &str, instance_type: &str, placement: Option<&str>) -> Offering {
        Offering {
            provider: provider.into(),
            instance_type: instance_type.into(),
            placement: placement.map(Into::into),
        }
    }

    #[test]
    fn candidates_are_the_shape_in_each_zone_then_each_fallback_in_its_providers_zones() {
        let zones = |names: &[&str], spread: bool| Placements {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            spread,
        };
        let placements = BTreeMap::from([
            ("gce".to_owned(), zones(&["a", "b"], false)),
            ("ec2".to_owned(), zones(&[], false)),
        ]);
        let id = uuid::Uuid::from_bytes([1; 16]);
        let fallbacks = [
            Fallback {
                provider: None,
                instance_type: Some("small".into()),
            },
            Fallback {
                provider: Some("ec2".into()),
                instance_type: None,
            },
            // The same as the shape: tried once.
            Fallback {
                provider: Some("gce".into()),
                instance_type: Some("big".into()),
            },
        ];
        assert_eq!(
            candidates(id, "gce", "big", &fallbacks, &placements),
            [
                offering("gce", "big", Some("a")),
                offering("gce", "big", Some("b")),
                offering("gce", "small", Some("a")),
                offering("gce", "small", Some("b")),
                offering("ec2", "big", None),
            ]
        );
        assert_eq!(
            candidates(id, "fake", "standard", &[], &BTreeMap::new()),
            [offering("fake", "standard", None)]
        );
        // Equal placements (EC2's subnets): each instance starts at the one its id picks
        // and goes round.
        let subnets = BTreeMap::from([("ec2".to_owned(), zones(&["s0", "s1", "s2"], true))]);
        let order = |first: u8| -> Vec<Option<String>> {
            let id = uuid::Uuid::from_bytes([first; 16]);
            candidates(id, "ec2", "big", &[], &subnets)
                .into_iter()
                .map(|o| o.placement)
                .collect()
        };
        let named = |names: [&str; 3]| names.map(|n| Some(n.to_owned())).to_vec();
        assert_eq!(order(0), named(["s0", "s1", "s2"]));
        assert_eq!(order(1), named(["s1", "s2", "s0"]));
        assert_eq!(order(5), named(["s2", "s0", "s1"]));
    }

    #[test]
    fn the_first_offering_with_room_is_chosen_and_none_when_none_has() {
        let all = [
            offering("gce", "big", Some("a")),
            offering("gce", "big", Some("b")),
            offering("ec2", "big", None),
        ];
        let mut full = HashSet::new();
        assert_eq!(choose(&all, &full), Some(&all[0]));
        full.insert(all[0].clone());
        assert_eq!(choose(&all, &full), Some(&all[1]));
        full.insert(all[1].clone());
        // An offering elsewhere (another config's, another zone's) does not count.
        full.insert(offering("gce", "small", Some("b")));
        assert_eq!(choose(&all, &full), Some(&all[2]));
        full.insert(all[2].clone());
        assert_eq!(choose(&all, &full), None);
    }
}
