// The official JavaScript SDK (@a2a-js/sdk, from npm) against the gateway: one message sent,
// one streamed. Prints {"sent": the task's id, state and answer, "streamed": what the stream went through}.
const { ClientFactory } = require("@a2a-js/sdk/client");
const { Role, TaskState } = require("@a2a-js/sdk");

function message(id, text) {
  return { message: { messageId: id, contextId: "", taskId: "", role: Role.ROLE_USER, metadata: undefined,
                      extensions: [], referenceTaskIds: [], parts: [{ content: { $case: "text", value: text } }] },
           tenant: "", configuration: undefined, metadata: undefined };
}

function stateOf(event) {
  const payload = event.payload;
  if (payload.$case === "task") return TaskState[payload.value.status.state];
  if (payload.$case === "statusUpdate") return TaskState[payload.value.status.state];
  return payload.$case;
}

async function main() {
  const client = await new ClientFactory().createFromUrl(process.argv[2]);
  const sent = await client.sendMessage(message(`js-send-${Date.now()}`, "hello from javascript"));
  const streamed = [];
  for await (const event of client.sendMessageStream(message(`js-stream-${Date.now()}`, "streamed from javascript"))) {
    streamed.push(stateOf(event));
  }
  console.log(JSON.stringify({ sent: { id: sent.id, status: { state: TaskState[sent.status.state] },
                                                answer: sent.artifacts[0].parts[0].content.value }, streamed }));
}

main().catch((error) => { console.error(error); process.exit(1); });
