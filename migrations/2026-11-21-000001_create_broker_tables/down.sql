DROP TABLE jobs;
DROP TABLE instance_events;
DROP TABLE instances;
DROP TABLE providers;
DROP TABLE auth_tokens;
