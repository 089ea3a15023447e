ALTER TABLE providers DROP COLUMN offer;
