DROP FUNCTION claimed_instance(UUID);
