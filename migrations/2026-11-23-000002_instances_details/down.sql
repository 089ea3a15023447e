UPDATE instances SET details = details -> 'ecs';
ALTER TABLE instances RENAME COLUMN details TO ecs;
