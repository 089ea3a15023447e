-- Tokens keep Cloud Brain's columns and encoding (bytea salt and hash) so its rows carry over.
CREATE TABLE auth_tokens (
    id SERIAL PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    token_salt BYTEA NOT NULL,
    token_hash BYTEA NOT NULL,
    scope TEXT NOT NULL DEFAULT 'client' CHECK (scope IN ('client', 'admin')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);

-- A provider config is JSON sealed with NaCl secretbox (24-byte nonce, then the box).
CREATE TABLE providers (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL CHECK (type IN ('fake', 'ec2', 'gce')),
    config BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE instances (
    id UUID PRIMARY KEY,
    owner_token_id INTEGER NOT NULL REFERENCES auth_tokens (id),
    provider_name TEXT NOT NULL REFERENCES providers (name),
    image TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    public_ssh_key TEXT,
    state TEXT NOT NULL CHECK (
        state IN ('creating', 'starting', 'running', 'terminating', 'terminated', 'errored')
    ),
    ip_address TEXT,
    upstream_id TEXT,
    error_reason TEXT,
    idempotency_key TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    terminated_at TIMESTAMPTZ,
    CONSTRAINT instances_owner_idempotency_key UNIQUE (owner_token_id, idempotency_key)
);

-- Listing is newest first, keyset-paginated on (created_at, id), for one owner or for all.
CREATE INDEX instances_owner_created ON instances (owner_token_id, created_at DESC, id DESC);
CREATE INDEX instances_created ON instances (created_at DESC, id DESC);
CREATE INDEX instances_state ON instances (state);
CREATE INDEX instances_provider_state ON instances (provider_name, state);

CREATE TABLE instance_events (
    id BIGSERIAL PRIMARY KEY,
    instance_id UUID NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX instance_events_instance ON instance_events (instance_id, id);

CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('create', 'remove')),
    instance_id UUID NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    run_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_by TEXT,
    locked_until TIMESTAMPTZ,
    last_error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX jobs_runnable ON jobs (run_at) WHERE status = 'queued';
CREATE INDEX jobs_instance ON jobs (instance_id, kind);
