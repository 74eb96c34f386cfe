"""What every command leans on: the one user-facing error type, outputs that are complete or absent,
clean interrupts, and the user's cache."""
