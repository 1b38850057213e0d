// The Spectral container and what the Worker needs to reach it: the Durable Object class that
// runs `spectral serve`, the environment it is given, the one instance every request goes to,
// and the answer when it cannot be reached. Kept apart from index.ts, whose exports workerd
// reads as entrypoints.

import { Container, getContainer } from "@cloudflare/containers";

/** The port `spectral serve` listens on (its default `SPECTRAL_ADDR` is 0.0.0.0:8000). */
export const CONTAINER_PORT = 8000;

/**
 * How long the container keeps running after the last request. The cron trigger in
 * wrangler.toml pings more often than this, so in practice the container never sleeps; this is
 * the bound on how long it runs if the trigger is removed.
 */
export const SLEEP_AFTER = "15m";

/**
 * The name of the one container instance every request and every ping goes to
 * (`max_instances = 1` in wrangler.toml): the API and the workers run in that one process.
 */
export const INSTANCE = "spectral";

/** The Worker's bindings, vars and secrets (see wrangler.toml and docs/deploy.md). */
export interface Env {
  SPECTRAL: DurableObjectNamespace<SpectralContainer>;
  /** Secret: the Postgres DSN (the session pooler, so that LISTEN works). */
  DATABASE_URL?: string;
  /** Set per deploy (`wrangler deploy --var SPECTRAL_GENERATION:<n>`). */
  SPECTRAL_GENERATION?: string;
  /** Any other `SPECTRAL_*` var or secret is passed through as well. */
  [name: string]: unknown;
}

/**
 * The container's environment: `DATABASE_URL` and every `SPECTRAL_*` var or secret of the
 * Worker, and nothing else (bindings are objects and never leave the Worker).
 */
export function containerEnv(env: Record<string, unknown>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of Object.entries(env)) {
    if (typeof value !== "string") continue;
    if (name === "DATABASE_URL" || name.startsWith("SPECTRAL_")) out[name] = value;
  }
  return out;
}

/** The container, run as a Durable Object by `@cloudflare/containers`. */
export class SpectralContainer extends Container<Env> {
  defaultPort = CONTAINER_PORT;
  sleepAfter = SLEEP_AFTER;
  // The start-up probe: any HTTP answer means the port is open; /version is the cheapest.
  pingEndpoint = "localhost/version";

  constructor(ctx: ConstructorParameters<typeof Container>[0], env: Env) {
    super(ctx, env);
    this.envVars = containerEnv(env);
  }
}

/** The container's stub; every request and every ping reaches the same instance. */
export function container(env: Env): DurableObjectStub<SpectralContainer> {
  return getContainer(env.SPECTRAL, INSTANCE);
}

/** The path the keep-awake ping asks for: cheap, and logged by the service like any request. */
export const PING_PATH = "/health";

/** A 503 problem for a request the container could not take. */
export function unavailable(): Response {
  const problem = {
    type: "about:blank",
    title: "Service Unavailable",
    status: 503,
    detail: "the service is starting or being replaced; retry shortly",
  };
  return new Response(JSON.stringify(problem), {
    status: 503,
    headers: { "content-type": "application/problem+json", "retry-after": "5" },
  });
}
