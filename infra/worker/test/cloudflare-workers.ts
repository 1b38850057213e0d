// A stand-in for workerd's `cloudflare:workers` module in Node: just the base classes that
// `@cloudflare/containers` extends, holding `ctx` and `env` as the real ones do.

export class DurableObject<Env = unknown> {
  constructor(
    public ctx: DurableObjectState,
    public env: Env,
  ) {}
}

export class WorkerEntrypoint<Env = unknown, Props = unknown> {
  constructor(
    public ctx: ExecutionContext<Props>,
    public env: Env,
  ) {}
}
