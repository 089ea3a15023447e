-- What ECS says of an instance's machine, for providers whose machines join a cluster.
ALTER TABLE instances ADD COLUMN ecs JSONB;
