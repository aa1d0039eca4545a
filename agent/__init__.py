"""layrot.agent: the in-job side: background reporter, transport and command intake (framework-free)."""
