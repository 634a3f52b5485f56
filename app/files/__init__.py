"""Private file uploads: streamed, size-capped, type-checked, images cleaned and thumbnailed."""
