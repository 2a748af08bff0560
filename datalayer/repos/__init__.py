"""Repositories: thin, typed wrappers over the named queries of one domain each."""
