"""One A2A operation with the official a2a-sdk client, for the gateway tests (run by an
interpreter that has the SDK: under Python 3.9, which it does not support, .ci/run's side one).

    echo '{"op": "send", "url": "http://127.0.0.1:8389/agents/a1", "text": "hi", ...}' | a2a_client.py

Prints one JSON object a line as it happens (ProtoJSON of each StreamResponse, Task or card),
and {"error": {"type", "message"}} for an error the SDK raised.
"""

import asyncio
import json
import sys

import httpx
from google.protobuf.json_format import MessageToDict, ParseDict

from a2a.client import ClientConfig, create_client
from a2a.client.card_resolver import A2ACardResolver
from a2a.types.a2a_pb2 import CancelTaskRequest, GetTaskRequest, Message, SendMessageRequest, SubscribeToTaskRequest


def say(value) -> None:
    print(json.dumps(value if isinstance(value, dict) else MessageToDict(value)), flush=True)


async def run(spec: dict) -> None:
    headers = {"Authorization": f"Bearer {spec['token']}"} if spec.get("token") else {}
    async with httpx.AsyncClient(headers=headers, timeout=120) as http:
        if spec["op"] == "card":
            say(await A2ACardResolver(http, spec["url"]).get_agent_card())
            return
        client = await create_client(spec["url"], ClientConfig(httpx_client=http, streaming=spec.get("stream", False),
                                                               polling=spec.get("polling", False)))
        if spec["op"] == "send":
            message = {"messageId": spec["message_id"], "role": "ROLE_USER",
                       "parts": [{"text": spec["text"]}] + ([{"data": spec["data"]}] if "data" in spec else [])}
            for key, field in (("context_id", "contextId"), ("task_id", "taskId")):
                if spec.get(key):
                    message[field] = spec[key]
            request = SendMessageRequest(message=ParseDict(message, Message()))
            async for event in client.send_message(request):
                say(event)
        elif spec["op"] == "get":
            say(await client.get_task(GetTaskRequest(id=spec["task_id"])))
        elif spec["op"] == "cancel":
            say(await client.cancel_task(CancelTaskRequest(id=spec["task_id"])))
        elif spec["op"] == "subscribe":
            async for event in client.subscribe(SubscribeToTaskRequest(id=spec["task_id"])):
                say(event)


def main() -> None:
    try:
        asyncio.run(run(json.loads(sys.stdin.read())))
    except Exception as exc:  # what the SDK raised, for the test to read
        say({"error": {"type": type(exc).__name__, "message": str(exc)}})


if __name__ == "__main__":
    main()
