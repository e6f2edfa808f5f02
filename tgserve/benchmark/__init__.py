"""Load generation and the `tgserve bench` sweep (the repository's bench/ scripts build on these)."""
