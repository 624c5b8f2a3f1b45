"""What a user writes instead of agent2389: paho takes the task, one worker thread asks the
official `openai` SDK, paho publishes the answer. No progress events, no dedupe, no tracing,
no status: the floor of the same job done by hand.

    python benchmarks/peer_openai.py BROKER_PORT AGENT_ID LLM_BASE_URL

Needs the `openai` package: `benchmarks/instructions.py` installs it in a side environment
(benchmarks/.peer-venv), so the project's dependencies do not change.
"""

import json
import queue
import socket
import sys
import threading

import paho.mqtt.client as mqtt
from openai import OpenAI

PORT, AGENT, BASE_URL = int(sys.argv[1]), sys.argv[2], sys.argv[3]
llm = OpenAI(base_url=BASE_URL, api_key="sk-bench")
tasks: "queue.Queue[mqtt.MQTTMessage]" = queue.Queue()


def on_connect(client, userdata, flags, reason_code, properties):
    client.subscribe(f"/control/agents/{AGENT}/input", 1)


def worker(client: mqtt.Client) -> None:
    while True:
        task = json.loads(tasks.get().payload)
        completion = llm.chat.completions.create(model="bench", messages=[
            {"role": "system", "content": task.get("instruction") or ""},
            {"role": "user", "content": json.dumps(task.get("input"))}])
        reply = {"response": completion.choices[0].message.content, "task_id": task["task_id"]}
        client.publish(f"/conversations/{task['conversation_id']}/{AGENT}", json.dumps(reply), qos=1)


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"peer-{AGENT}", protocol=mqtt.MQTTv5)
client.on_connect = on_connect
client.on_message = lambda client, userdata, message: tasks.put(message)
client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
threading.Thread(target=worker, args=(client,), daemon=True).start()
client.connect("127.0.0.1", PORT, 60)
print("ready", flush=True)
client.loop_forever()
