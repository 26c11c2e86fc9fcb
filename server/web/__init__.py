"""The broker's HTTP face: MCP over Streamable HTTP and SSE, and (later) its pages."""
