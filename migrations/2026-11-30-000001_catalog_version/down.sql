DROP TRIGGER pools_catalog_version ON pools;
DROP TRIGGER providers_catalog_version ON providers;
DROP FUNCTION bump_catalog_version();
DROP TABLE catalog_version;
