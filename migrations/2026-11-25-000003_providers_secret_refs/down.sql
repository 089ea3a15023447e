ALTER TABLE providers DROP COLUMN secret_refs;
