// Not run: type-checked against nkservice.d.ts (`npm run check-types`), as a TypeScript
// user (the dashboard) writes it.
import { NkClient, NkError, type LoginAnswer, type NkEvent, type Subscription } from "../nkservice.js";

async function use(): Promise<void> {
  const client = new NkClient("ws://127.0.0.1:9010/", {
    user: "admin", password: "admin", meta: { device: "browser" }, sessionId: undefined,
    login: {}, reconnect: true, backoff: { initial: 0.1, max: 10 }, requestTimeout: 5,
    WebSocket: globalThis.WebSocket, // the DOM's class fits the option
  });
  const login: LoginAnswer = await client.connect();
  const resumed: boolean | undefined = login.resumed;
  const services = await client.request<{ name: string }[]>("core", "list_services", {},
    { subclass: undefined, timeout: undefined });
  services.map((service) => service.name.toUpperCase());
  const sub: Subscription = await client.subscribe(
    { class: "chat", subclass: "*", type: "*", obj_id: "*", service: undefined, body: undefined },
    (event: NkEvent) => { console.log(event.class, event.body, resumed); });
  const subclass: string = sub.filter.subclass;
  await sub.unsubscribe();
  const remove: () => void = client.handle("myclass", "mycmd", async (data, request) => {
    if (request.cmd !== "mycmd") throw new NkError("unknown_command", `Unknown command '${request.cmd}'`);
    return { echo: data, subclass };
  });
  remove();
  await client.registerCallback("login", { class: undefined, service: undefined });
  await client.registerCallback("cmd", { class: "notes" }, ({ request }) => ({ cmd: request.cmd }));
  const onEvent = (event: NkEvent) => console.log(event.type);
  client.on("connected", (answer) => console.log(answer.session_id))
    .on("disconnected", ({ code, reason }) => console.log(code, reason))
    .on("reconnecting", ({ attempt, delay, error }) => console.log(attempt, delay, error?.code))
    .on("closed", ({ reason }) => console.log(reason))
    .on("event", onEvent)
    .on("error", (error) => console.error(error));
  client.off("event", onEvent);
  const state: "idle" | "connecting" | "connected" | "reconnecting" | "closed" = client.state;
  const id: string | undefined = client.sessionId;
  console.log(state, id, NkError.codes.unauthorized);
  try {
    await client.request("core", "nope");
  } catch (error) {
    if (error instanceof NkError && error.code === "unknown_command") console.log(error.number, error.data);
  }
  await client.close();
}

use();
