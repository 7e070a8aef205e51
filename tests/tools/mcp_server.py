"""A real MCP server (the ``mcp`` package's MCPServer, streamable HTTP) for the mcp tool tests.

Run as ``python mcp_server.py PORT json|sse``; it listens on 127.0.0.1:PORT at ``/mcp``.
"""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("noetl-test")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def greet(name: str) -> str:
    """Greet someone."""
    return f"hello {name}"


@server.tool()
def explode() -> str:
    """Always fails."""
    raise ValueError("exploded on purpose")


if __name__ == "__main__":
    port = int(sys.argv[1])
    json_response = sys.argv[2] == "json"
    server.run("streamable-http", host="127.0.0.1", port=port, json_response=json_response)
