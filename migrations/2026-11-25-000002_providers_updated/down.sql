ALTER TABLE instances ADD CONSTRAINT instances_provider_name_fkey
    FOREIGN KEY (provider_name) REFERENCES providers (name);
ALTER TABLE providers DROP COLUMN updated_at;
