"""Everything that talks to Auth0: the client, token verification, the stdio identity and login."""
