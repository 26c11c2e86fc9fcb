"""token-vault-mcp: the MCP server that brokers Token Vault credentials."""
