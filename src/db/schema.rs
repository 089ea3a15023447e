// @generated automatically by Diesel CLI.

diesel::table! {
    auth_tokens (id) {
        id -> Int4,
        description -> Text,
        token_salt -> Bytea,
        token_hash -> Bytea,
        scope -> Text,
        created_at -> Timestamptz,
        last_used_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    catalog_version (only_row) {
        only_row -> Bool,
        version -> Int8,
    }
}

diesel::table! {
    instance_events (id) {
        id -> Int8,
        instance_id -> Uuid,
        from_state -> Nullable<Text>,
        to_state -> Text,
        reason -> Nullable<Text>,
        at -> Timestamptz,
        tx -> Int8,
    }
}

diesel::table! {
    instances (id) {
        id -> Uuid,
        owner_token_id -> Nullable<Int4>,
        provider_name -> Text,
        image -> Text,
        instance_type -> Text,
        public_ssh_key -> Nullable<Text>,
        state -> Text,
        ip_address -> Nullable<Text>,
        upstream_id -> Nullable<Text>,
        error_reason -> Nullable<Text>,
        idempotency_key -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        terminated_at -> Nullable<Timestamptz>,
        details -> Nullable<Jsonb>,
        expires_at -> Nullable<Timestamptz>,
        pool_name -> Nullable<Text>,
        assigned_at -> Nullable<Timestamptz>,
        placement -> Nullable<Text>,
        asked -> Nullable<Jsonb>,
        key_pending_since -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    jobs (id) {
        id -> Int8,
        kind -> Text,
        instance_id -> Uuid,
        status -> Text,
        attempts -> Int4,
        run_at -> Timestamptz,
        locked_by -> Nullable<Text>,
        locked_until -> Nullable<Timestamptz>,
        last_error -> Nullable<Text>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    pools (name) {
        name -> Text,
        provider_name -> Text,
        image -> Text,
        instance_type -> Text,
        min_idle -> Int4,
        max_size -> Int4,
        max_lifetime_secs -> Nullable<Int8>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        fallbacks -> Jsonb,
    }
}

diesel::table! {
    providers (id) {
        id -> Uuid,
        name -> Text,
        #[sql_name = "type"]
        type_ -> Text,
        config -> Bytea,
        created_at -> Timestamptz,
        offer -> Nullable<Jsonb>,
        updated_at -> Timestamptz,
        secret_refs -> Nullable<Jsonb>,
        max_lifetime_secs -> Nullable<Int8>,
        fallbacks -> Jsonb,
    }
}

diesel::table! {
    unavailable_offerings (provider_name, instance_type, placement) {
        provider_name -> Text,
        instance_type -> Text,
        placement -> Text,
        until -> Timestamptz,
        reason -> Text,
    }
}

diesel::table! {
    webhook_deliveries (id) {
        id -> Int8,
        webhook_id -> Int8,
        event_id -> Int8,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        locked_until -> Nullable<Timestamptz>,
        last_status -> Nullable<Int4>,
        last_error -> Nullable<Text>,
        created_at -> Timestamptz,
        delivered_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    webhooks (id) {
        id -> Int8,
        kind -> Text,
        url -> Text,
        secret -> Nullable<Bytea>,
        events -> Array<Nullable<Text>>,
        provider -> Nullable<Text>,
        pool -> Nullable<Text>,
        instance_id -> Nullable<Uuid>,
        created_at -> Timestamptz,
        deleted_at -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(instance_events -> instances (instance_id));
diesel::joinable!(instances -> auth_tokens (owner_token_id));
diesel::joinable!(instances -> pools (pool_name));
diesel::joinable!(jobs -> instances (instance_id));
diesel::joinable!(webhook_deliveries -> instance_events (event_id));
diesel::joinable!(webhook_deliveries -> webhooks (webhook_id));

diesel::allow_tables_to_appear_in_same_query!(
    auth_tokens,
    catalog_version,
    instance_events,
    instances,
    jobs,
    pools,
    providers,
    unavailable_offerings,
    webhook_deliveries,
    webhooks,
);
