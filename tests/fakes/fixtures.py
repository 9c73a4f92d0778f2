"""Pytest fixtures that start the emulators and sshd instances (owned by the providers work)."""
