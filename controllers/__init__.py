"""layrot.controllers: rate policies that drive running jobs through a collector."""
