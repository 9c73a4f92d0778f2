"""The instance lifecycle: provisioning and teardown, the agent session, pull-back, and the
attempt that composes them (one implementation, also behind ``loraburst attach``)."""
