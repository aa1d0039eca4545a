"""layrot.core: the pure domain (numpy only): rotation math, Layca rate rules, the layer rule."""
