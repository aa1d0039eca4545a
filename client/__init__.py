"""layrot.client: the operator's side of the wire, a query and control client of a collector."""
