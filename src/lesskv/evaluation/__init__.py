"""Quality evaluations; each is a client of the one attention path in lesskv.hf."""
