-- Where a config's secrets came from when a fleet file named them ({"$env": "NAME"} or
-- {"$file": "path"}, by dotted field path): an export prints these, never the secrets.
ALTER TABLE providers ADD COLUMN secret_refs JSONB;
