-- One number that moves whenever a provider or a pool changes. An http process keeps what
-- a provider offers for a request's image in memory with the number it was read at, and
-- writes a request's instance only where the number has not moved since (in the insert's
-- own statement): one round trip per request, never a stale shape.
CREATE TABLE catalog_version (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version bigint NOT NULL
);
INSERT INTO catalog_version (version) VALUES (0);

CREATE FUNCTION bump_catalog_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE catalog_version SET version = version + 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER providers_catalog_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON providers FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_version();
CREATE TRIGGER pools_catalog_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON pools FOR EACH STATEMENT EXECUTE FUNCTION bump_catalog_version();
