"""Teacher loading, attention swap and converted-model I/O."""
