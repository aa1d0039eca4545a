"""layrot.deploy: deployment files (dashboards, rules, manifests) shipped as package data."""
