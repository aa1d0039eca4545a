"""layrot.proto: the wire protocol: generated messages, column packing and what a RateCommand means."""
