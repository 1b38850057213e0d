// The Worker's contract: every request reaches the one container as it came in, every response
// comes back as the container gave it (streamed), the cron keeps that same container awake,
// and the container gets exactly the configuration it needs.

import { describe, expect, it, vi } from "vitest";

import {
  CONTAINER_PORT,
  INSTANCE,
  PING_PATH,
  SLEEP_AFTER,
  SpectralContainer,
  containerEnv,
  type Env,
} from "../src/container";
import worker from "../src/index";

/** One call the container binding received: which instance, and the request it was handed. */
interface Call {
  instance: string;
  request: Request;
}

/**
 * An `Env` whose container binding is a stub: `idFromName`/`get` resolve an instance by name
 * as the Durable Object namespace does, and its `fetch` records the request and answers with
 * `answer`.
 */
function setup(answer: (request: Request) => Response | Promise<Response>) {
  const calls: Call[] = [];
  const namespace = {
    idFromName: (name: string) => ({ name }),
    get: (id: { name: string }) => ({
      fetch: async (request: Request) => {
        calls.push({ instance: id.name, request });
        return answer(request);
      },
    }),
  };
  const env = {
    SPECTRAL: namespace as unknown as Env["SPECTRAL"],
    DATABASE_URL: "postgres://spectral:pw@aws-0-eu-central-1.pooler.supabase.com:5432/postgres",
    SPECTRAL_GENERATION: "41",
  } satisfies Env;
  return { env, calls };
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

describe("fetch", () => {
  it("hands the container the request itself: method, path, query, headers and body", async () => {
    const { env, calls } = setup(() => new Response("ok"));
    const body = JSON.stringify({ action: "wire_transfer.release", context: { amount: 25000 } });
    const request = new Request(
      "https://spectral.example.com/api/decide?explain=true&tag=a%20b&tag=c",
      {
        method: "POST",
        headers: {
          authorization: "Bearer spk_example",
          "content-type": "application/json",
          "x-correlation-id": "abc-123",
          "last-event-id": "17",
        },
        body,
      },
    );

    await worker.fetch(request, env);

    expect(calls).toHaveLength(1);
    const seen = calls[0].request;
    // The very same object: nothing rebuilt, so nothing can be dropped or rewritten.
    expect(seen).toBe(request);
    expect(seen.method).toBe("POST");
    const url = new URL(seen.url);
    expect(url.pathname).toBe("/api/decide");
    expect(url.searchParams.getAll("tag")).toEqual(["a b", "c"]);
    expect(url.searchParams.get("explain")).toBe("true");
    expect(seen.headers.get("authorization")).toBe("Bearer spk_example");
    expect(seen.headers.get("content-type")).toBe("application/json");
    expect(seen.headers.get("x-correlation-id")).toBe("abc-123");
    expect(seen.headers.get("last-event-id")).toBe("17");
    expect(await seen.text()).toBe(body);
  });

  it.each(["GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "POST"])(
    "passes %s through",
    async (method) => {
      const { env, calls } = setup((r) => new Response(null, { status: 204, headers: { "x-method": r.method } }));
      const hasBody = !["GET", "HEAD"].includes(method);
      const request = new Request("https://spectral.example.com/api/worlds/acme-payments/draft", {
        method,
        body: hasBody ? "{}" : undefined,
      });
      const response = await worker.fetch(request, env);
      expect(calls[0].request.method).toBe(method);
      expect(response.headers.get("x-method")).toBe(method);
    },
  );

  it("passes a binary body byte for byte, as a stream", async () => {
    const bytes = Uint8Array.from({ length: 64 * 1024 }, (_, i) => i % 256);
    const { env } = setup(async (r) => {
      const received = new Uint8Array(await r.arrayBuffer());
      return new Response(received, { headers: { "content-type": "application/octet-stream" } });
    });
    const request = new Request("https://spectral.example.com/upload", {
      method: "PUT",
      body: new ReadableStream({
        start(c) {
          // Two chunks, to show a body that is not one buffer arrives whole.
          c.enqueue(bytes.slice(0, 1000));
          c.enqueue(bytes.slice(1000));
          c.close();
        },
      }),
      // Node's fetch needs this for a streamed request body; workerd ignores it.
      duplex: "half",
    } as RequestInit);
    const response = await worker.fetch(request, env);
    expect(new Uint8Array(await response.arrayBuffer())).toEqual(bytes);
  });

  it("returns the container's response itself: status, headers and body", async () => {
    const problem = JSON.stringify({ title: "Conflict", status: 409, detail: "version 3 exists" });
    const answer = new Response(problem, {
      status: 409,
      statusText: "Conflict",
      headers: {
        "content-type": "application/problem+json",
        "x-request-id": "0190-abc",
        "retry-after": "5",
      },
    });
    const { env } = setup(() => answer);
    const response = await worker.fetch(new Request("https://spectral.example.com/api/worlds/a/versions"), env);
    expect(response).toBe(answer);
    expect(response.status).toBe(409);
    expect(response.statusText).toBe("Conflict");
    expect(response.headers.get("content-type")).toBe("application/problem+json");
    expect(response.headers.get("x-request-id")).toBe("0190-abc");
    expect(response.headers.get("retry-after")).toBe("5");
    expect(await response.text()).toBe(problem);
  });

  it("streams server-sent events as the container writes them, not when it finishes", async () => {
    let events!: ReadableStreamDefaultController<Uint8Array>;
    const { env } = setup(
      () =>
        new Response(
          new ReadableStream<Uint8Array>({
            start(c) {
              events = c;
            },
          }),
          { headers: { "content-type": "text/event-stream", "cache-control": "no-cache" } },
        ),
    );
    const response = await worker.fetch(
      new Request("https://spectral.example.com/api/agent/runs/r1/events", {
        headers: { accept: "text/event-stream", "last-event-id": "1" },
      }),
      env,
    );
    expect(response.headers.get("content-type")).toBe("text/event-stream");
    const reader = response.body!.getReader();

    // Each event is readable before the next one exists: nothing waits for the end.
    events.enqueue(encoder.encode("id: 2\nevent: node\ndata: {\"node\":\"draft\"}\n\n"));
    const first = await reader.read();
    expect(decoder.decode(first.value)).toBe("id: 2\nevent: node\ndata: {\"node\":\"draft\"}\n\n");

    events.enqueue(encoder.encode("id: 3\nevent: token\ndata: amount\n\n"));
    const second = await reader.read();
    expect(decoder.decode(second.value)).toBe("id: 3\nevent: token\ndata: amount\n\n");

    events.close();
    expect((await reader.read()).done).toBe(true);
  });

  it("answers a retryable 503 when the container cannot be reached", async () => {
    const { env } = setup(() => {
      throw new Error("Durable Object reset because its code was updated.");
    });
    const logged = vi.spyOn(console, "error").mockImplementation(() => {});
    const response = await worker.fetch(new Request("https://spectral.example.com/health"), env);
    expect(logged).toHaveBeenCalledOnce();
    logged.mockRestore();
    expect(response.status).toBe(503);
    expect(response.headers.get("content-type")).toBe("application/problem+json");
    expect(response.headers.get("retry-after")).toBe("5");
    expect(await response.json()).toMatchObject({ status: 503, title: "Service Unavailable" });
  });

  it("sends every request to the same container instance", async () => {
    const { env, calls } = setup(() => new Response("ok"));
    await worker.fetch(new Request("https://spectral.example.com/health"), env);
    await worker.fetch(new Request("https://spectral.example.com/api/decide", { method: "POST", body: "{}" }), env);
    expect(calls.map((c) => c.instance)).toEqual([INSTANCE, INSTANCE]);
  });
});

describe("scheduled", () => {
  it("pings the same container's /health, which keeps it awake", async () => {
    const { env, calls } = setup(() => new Response("{}", { status: 200 }));
    const controller = { cron: "*/5 * * * *", scheduledTime: Date.now(), noRetry() {} };
    await worker.scheduled(controller as ScheduledController, env);
    expect(calls).toHaveLength(1);
    expect(calls[0].instance).toBe(INSTANCE);
    expect(calls[0].request.method).toBe("GET");
    expect(new URL(calls[0].request.url).pathname).toBe(PING_PATH);
  });

  it("does not fail while the container is still starting", async () => {
    const { env, calls } = setup(() => new Response("starting", { status: 503 }));
    const controller = { cron: "*/5 * * * *", scheduledTime: Date.now(), noRetry() {} };
    const warned = vi.spyOn(console, "warn").mockImplementation(() => {});
    await expect(worker.scheduled(controller as ScheduledController, env)).resolves.toBeUndefined();
    expect(warned).toHaveBeenCalledWith("keep-awake ping: /health answered 503");
    warned.mockRestore();
    expect(calls).toHaveLength(1);
  });
});

describe("the container", () => {
  it("gets DATABASE_URL and every SPECTRAL_* var or secret, and nothing else", () => {
    expect(
      containerEnv({
        DATABASE_URL: "postgres://u:pw@h:5432/db",
        SPECTRAL_GENERATION: "41",
        SPECTRAL_OPERATOR_KEY: "spk_operator_key_0123456789",
        SPECTRAL_LOG_FORMAT: "json",
        SPECTRAL: { idFromName() {} },
        CLOUDFLARE_API_TOKEN: "not for the container",
        OTHER: "x",
      }),
    ).toEqual({
      DATABASE_URL: "postgres://u:pw@h:5432/db",
      SPECTRAL_GENERATION: "41",
      SPECTRAL_OPERATOR_KEY: "spk_operator_key_0123456789",
      SPECTRAL_LOG_FORMAT: "json",
    });
  });

  it("listens on port 8000, sleeps only when idle, and starts with the Worker's configuration", async () => {
    // The least of a Durable Object's state that the Container base class touches when it is
    // constructed.
    const ctx = {
      container: { running: false },
      storage: {
        kv: { get: () => undefined },
        sql: { exec: () => [] },
        setAlarm: async () => {},
        sync: async () => {},
      },
      blockConcurrencyWhile: (f: () => Promise<unknown>) => f(),
    };
    const { env } = setup(() => new Response("ok"));
    const c = new SpectralContainer(ctx as unknown as ConstructorParameters<typeof SpectralContainer>[0], env);
    expect(c.defaultPort).toBe(CONTAINER_PORT);
    expect(CONTAINER_PORT).toBe(8000);
    expect(c.sleepAfter).toBe(SLEEP_AFTER);
    expect(c.envVars).toEqual({
      DATABASE_URL: env.DATABASE_URL,
      SPECTRAL_GENERATION: "41",
    });
  });
});
