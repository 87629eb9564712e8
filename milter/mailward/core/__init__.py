"""The pure policy core: the model, the stage driver, policy, config (ARCHITECTURE.md)."""
