DROP TABLE unavailable_offerings;
ALTER TABLE instances DROP COLUMN placement;
ALTER TABLE pools DROP COLUMN fallbacks;
