"""An MCP client for the integration tests: the official Python SDK (`mcp`, installed by
scripts/test.sh), driven by a plan given as JSON on the command line, answering JSON on stdout.

Plan:
  {"transport": "http", "url": "...", "key": "spk_...",   # or
   "transport": "stdio", "command": "...", "args": [...],
   "lifecycle": "initialize" | "discover",                 # earlier revision (a session) or current
   "calls": [{"tool": "...", "arguments": {...}}, ...]}

Answer: {"protocol": "...", "session": bool, "tools": [...], "results": [...]}, each result
with isError, structuredContent and the text of its content.
"""

import asyncio
import contextlib
import json
import sys

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def dump(model):
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


async def run(plan):
    async with contextlib.AsyncExitStack() as stack:
        if plan["transport"] == "http":
            headers = {"Authorization": f"Bearer {plan['key']}"} if plan.get("key") else {}
            client = await stack.enter_async_context(create_mcp_http_client(headers=headers))
            read, write = await stack.enter_async_context(
                streamable_http_client(plan["url"], http_client=client)
            )
        else:
            params = StdioServerParameters(command=plan["command"], args=plan.get("args", []))
            read, write = await stack.enter_async_context(stdio_client(params))
        session = await stack.enter_async_context(ClientSession(read, write))
        if plan.get("lifecycle", "initialize") == "discover":
            await session.discover()
        else:
            await session.initialize()
        out = {"protocol": session.protocol_version, "tools": [], "results": []}
        listed = await session.list_tools()
        out["tools"] = [dump(t) for t in listed.tools]
        for call in plan.get("calls", []):
            result = await session.call_tool(call["tool"], call.get("arguments", {}))
            data = dump(result)
            out["results"].append(
                {
                    "isError": data.get("isError", False),
                    "structuredContent": data.get("structuredContent"),
                    "text": "".join(c.get("text", "") for c in data.get("content", [])),
                }
            )
        return out


def main():
    plan = json.loads(sys.argv[1])
    try:
        out = asyncio.run(asyncio.wait_for(run(plan), timeout=plan.get("timeout", 60)))
    except BaseException as e:  # the test reads the failure, it does not need a traceback
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
