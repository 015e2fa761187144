"""splitserve.tests."""
