//! Statements prepared once per connection.
//!
//! diesel-async keeps a per-connection cache of prepared statements, but diesel leaves
//! out of it every `UPDATE`, every `INSERT` whose values may be `DEFAULT`, every upsert and
//! every `sql_query`, because their text can vary with their values; each of those is
//! parsed anew, one more round trip before it runs. [`Cached`] puts such a statement in the
//! cache under its SQL text and bind types, so each shape it takes (a few, for a statement
//! with optional parts) is prepared once per connection. Wrap only statements whose text
//! has a bounded number of shapes: never one built with `format!` or with a list of
//! varying length.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::QueryResult;

/// A statement prepared once per connection for each text it takes.
#[derive(Debug, Clone, Copy)]
pub struct Cached<Q>(Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Cached<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

/// No static id: the cache keys the statement by its SQL text and bind types.
impl<Q> QueryId for Cached<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Cached<Q> {
    type SqlType = Q::SqlType;
}

/// `.cached()` on a statement: see [`Cached`].
pub trait CacheStatement: QueryFragment<Pg> + Sized {
    /// This statement, prepared once per connection for each text it takes.
    fn cached(self) -> Cached<Self> {
        Cached(self)
    }
}

impl<Q: QueryFragment<Pg>> CacheStatement for Q {}
