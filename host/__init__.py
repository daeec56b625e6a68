"""sparsa host runtime."""
