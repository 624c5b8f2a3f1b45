"""Model Context Protocol tool servers: the client side, with the stdlib and requests only."""
