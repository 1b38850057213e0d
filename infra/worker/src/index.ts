// The Worker that fronts the Spectral container. Cloudflare sends every request to a Worker;
// this one hands each request, unchanged, to the one `spectral serve` container on port 8000,
// and answers with the container's response, unchanged and streamed (SSE included). A cron
// trigger pings the container so that it stays awake between requests: the outbox consumer
// and the World Agent run inside it and have work to do when no request is arriving.

import { PING_PATH, container, unavailable, type Env } from "./container";

export { SpectralContainer } from "./container";

export default {
  /** Every request, whatever its method, path, query, headers or body, goes to the container. */
  async fetch(request: Request, env: Env): Promise<Response> {
    try {
      return await container(env).fetch(request);
    } catch (error) {
      // The container's Durable Object could not be reached (it is being replaced by a deploy,
      // say). Answer as the service answers when it is not ready: a retryable 503 in
      // problem+json, rather than the platform's error page.
      console.error("container unreachable", error);
      return unavailable();
    }
  },

  /**
   * Keep the container awake: a request renews its activity timer, and starts it again if a
   * rollout or a crash stopped it. The answer (200, or 503 while it starts) does not matter.
   */
  async scheduled(controller: ScheduledController, env: Env): Promise<void> {
    const response = await container(env).fetch(
      new Request(`http://spectral${PING_PATH}`, {
        headers: { "user-agent": `spectral-keepalive (${controller.cron})` },
      }),
    );
    // Drain the body so that the request is finished and the connection reused.
    await response.arrayBuffer();
    if (!response.ok) console.warn(`keep-awake ping: /health answered ${response.status}`);
  },
} satisfies ExportedHandler<Env>;
