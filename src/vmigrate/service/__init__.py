"""Services: what the CLI (and later the API) call. They own host sessions and the store."""
