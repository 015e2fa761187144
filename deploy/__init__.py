"""splitserve.deploy."""
